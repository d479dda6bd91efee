"""Asking the agent's resolvers (common/dnsupstream.py), against small servers on loopback: no root."""

import asyncio
import socket
import struct
import time

import dns.flags
import dns.message
import dns.rrset

from egressd.common.dnsupstream import ask


def answer(wire: bytes, *addresses: str, question: str | None = None) -> dns.message.Message:
    q = dns.message.from_wire(wire)
    if question is not None:  # an answer to another question, under the same id
        q = dns.message.make_query(question, "A", id=q.id)
    out = dns.message.make_response(q)
    out.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A", list(addresses)))
    return out


class Server(asyncio.DatagramProtocol):
    """UDP on a loopback port; `script` turns a query into the datagrams sent back, in order."""

    def __init__(self, script):
        self.script = script
        self.asked = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.asked += 1
        for out in self.script(data):
            self.transport.sendto(out, addr)


async def serve(script):
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: Server(script), local_addr=("127.0.0.1", 0)
    )
    return transport, server, transport.get_extra_info("sockname")[1]


def query(name="a.test"):
    return dns.message.make_query(name, "A", use_edns=0, payload=1232).to_wire()


def test_only_the_answer_to_this_question_is_taken():
    def script(wire):
        wrong_id = bytearray(answer(wire, "192.0.2.66").to_wire())
        wrong_id[:2] = struct.pack("!H", (struct.unpack("!H", wire[:2])[0] + 1) % 65536)
        return [
            bytes(wrong_id),  # another id
            b"\x00",  # not DNS
            wire[:2] + b"garbage",  # the id, then nothing that parses
            answer(wire, "192.0.2.67", question="b.test").to_wire(),  # the id, another question
            dns.message.from_wire(wire).to_wire(),  # the id and question, but a query, not an answer
            answer(wire, "192.0.2.1", question="a.TEST").to_wire(),  # the name in another case is the same
        ]

    async def scenario():
        transport, server, port = await serve(script)
        try:
            got = dns.message.from_wire(await ask(query("A.test"), "127.0.0.1", 2.0, port=port))
        finally:
            transport.close()
        assert [r.address for r in got.answer[0]] == ["192.0.2.1"]
        assert server.asked == 1

    asyncio.run(scenario())


def test_a_truncated_answer_is_asked_again_over_tcp():
    async def scenario():
        transport, _, port = await serve(lambda wire: [_truncated(wire)])
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))

        async def on_tcp(reader, writer):
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            wire = await reader.readexactly(size)
            out = answer(wire, *(f"198.51.100.{i}" for i in range(1, 41))).to_wire()
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_tcp, sock=tcp)
        try:
            got = dns.message.from_wire(await ask(query(), "127.0.0.1", 2.0, port=port))
        finally:
            transport.close()
            server.close()
        assert not got.flags & dns.flags.TC and len(got.answer[0]) == 40

    asyncio.run(scenario())


def _truncated(wire: bytes) -> bytes:
    out = dns.message.make_response(dns.message.from_wire(wire))
    out.flags |= dns.flags.TC
    return out.to_wire()


def test_silence_and_a_closed_port_are_no_answer_within_the_timeout():
    async def scenario():
        transport, server, port = await serve(lambda wire: [])
        t0 = time.monotonic()
        try:
            assert await ask(query(), "127.0.0.1", 0.3, port=port) is None
        finally:
            transport.close()
        assert 0.25 <= time.monotonic() - t0 < 1.5 and server.asked == 1
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        t0 = time.monotonic()
        assert await ask(query(), "127.0.0.1", 2.0, port=port) is None  # nobody there: refused at once
        assert time.monotonic() - t0 < 1.0

    asyncio.run(scenario())
