"""The control socket's framing: one JSON line per answer, streamed lists included (no root needed)."""

import asyncio
import json

import pytest

from egressd.agent.control import ControlServer, Streamed, request


def serve_once(tmp_path, answer, doc):
    """Start a server answering every request with answer(request), ask it doc from a thread, stop it."""
    path = str(tmp_path / "control.sock")

    async def handler(req):
        return answer(req)

    async def main():
        server = ControlServer(path, handler)
        await server.start()
        try:
            return await asyncio.to_thread(request, path, doc, 10.0)
        finally:
            await server.close()

    return asyncio.run(main())


@pytest.mark.parametrize("plain", [{}, {"agent": {"pid": 7, "name": "x\ny"}}])
@pytest.mark.parametrize("count", [0, 1, 20_000])
def test_a_streamed_list_reads_back_as_the_same_json_as_one_built_whole(tmp_path, plain, count):
    made = []

    def rows():
        for i in range(count):
            made.append(i)
            yield {"id": f"sb-{i}", "hostnames": [{"name": "ex\u00e4mple.com", "i": i}]}

    got = serve_once(
        tmp_path, lambda req: {**plain, "sandboxes": Streamed(rows()), "tail": [1]}, {"cmd": "x"}
    )
    expected = {**plain, "sandboxes": [{"id": f"sb-{i}", "hostnames": [{"name": "ex\u00e4mple.com", "i": i}]}
                                       for i in range(count)], "tail": [1]}  # fmt: skip
    assert got == json.loads(json.dumps(expected)) and len(made) == count


def test_an_answer_without_streamed_lists_is_unchanged(tmp_path):
    got = serve_once(tmp_path, lambda req: {"echo": req, "n": None}, {"cmd": "status", "k": [1, 2]})
    assert got == {"echo": {"cmd": "status", "k": [1, 2]}, "n": None}
