"""A world of namespaces shared by the integration tests of one module, and a real libnftables backend."""

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import Sandbox, parse_sandbox
from egressd.ruleset.render import render
from netns_fixtures import World, cleanup
from netns_fixtures.bulk import BulkNamespaces

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(request) -> Iterator[World]:
    prefix = f"eg{os.getpid() % 10000}{request.module.__name__.rsplit('_', 1)[-1][:3]}"
    cleanup(prefix)
    with World(prefix, sandboxes=2, vm=True) as w:
        yield w


@pytest.fixture(scope="module")
def backend() -> Iterator[LibnftBackend]:
    b = LibnftBackend()
    yield b
    b.close()


class Enforcer:
    """Applies a policy to a sandbox of the world, the way the agent does: parse, render, one transaction."""

    def __init__(self, backend: LibnftBackend) -> None:
        self.backend = backend

    def __call__(self, sb, config: Config | dict | None = None, **network_policy) -> Sandbox:
        cfg = config if isinstance(config, Config) else config_from_dict(config or {})
        record = parse_sandbox({"id": sb.name, "netns": sb.netns_path, "network_policy": network_policy})
        self.backend.apply(record.netns, render(record.policy, cfg))
        return record


@pytest.fixture
def enforce(world, backend) -> Iterator[Enforcer]:
    yield Enforcer(backend)
    for sb in world.sandboxes:
        backend.remove(sb.netns_path)


def nft_table(ns: str, family: str = "inet", name: str = "egressd") -> list[dict] | None:
    """One table as the kernel holds it, read with the nft CLI; None only when nft says it does not exist. Any
    other failure (a missing namespace, nft itself failing) fails the test: an absence must be read, not
    assumed from an error."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", family, name],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    if out.returncode != 0:
        # nft's own "no such table" (exit 1), not ip's "Cannot open network namespace" (exit 255)
        assert out.returncode == 1 and out.stderr.startswith("Error: No such file or directory"), out.stderr
        return None
    return [i for i in json.loads(out.stdout)["nftables"] if "metainfo" not in i]


def nft_json(ns: str, *args: str) -> list[dict]:
    """What the kernel holds, read with the nft CLI: an independent check of what egressd wrote."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", *args], capture_output=True, text=True, timeout=10
    )
    if out.returncode != 0:
        return []
    return [i for i in json.loads(out.stdout)["nftables"] if "metainfo" not in i]


@pytest.fixture
def agent(world, tmp_path):
    """A factory of `egressd run` processes; each test's agents are stopped and its tables removed after."""
    from tests.integration.agent import AgentProcess

    agents = []

    def make(**kw):
        a = AgentProcess(tmp_path / f"agent{len(agents)}", **kw)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.stop()
    for sb in world.sandboxes:
        subprocess.run(
            ["ip", "netns", "exec", sb.name, "nft", "delete", "table", "inet", "egressd"], capture_output=True
        )


def live_name(ns: str, neutral: str) -> str:
    """The name a per-variant object (decide, allow_dns4, ...) has in the table right now: decide_a or _b."""
    names = [
        i[k]["name"]
        for i in nft_json(ns, "list", "table", "inet", "egressd")
        for k in ("chain", "set")
        if k in i
    ]
    live = [n for n in names if n in (f"{neutral}_a", f"{neutral}_b")]
    assert len(live) == 1, names
    return live[0]


@pytest.fixture
def netns_name(request) -> Iterator[str]:
    """One throwaway network namespace, by name, for a test that needs a real one outside the world."""
    name = f"eg{request.module.__name__.rsplit('_', 1)[-1][:4]}{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def bulk_table(bulk: BulkNamespaces, ns: str) -> list[dict] | None:
    """`nft -j -a list table inet egressd` inside a bulk namespace (handles included): None when there is no
    table. Read with the nft CLI, never through egressd."""
    out = bulk.exec(ns, ["nft", "-j", "-a", "list", "table", "inet", "egressd"], check=False)
    if out.returncode != 0:
        assert "No such file or directory" in out.stderr, out.stderr
        return None
    return [i for i in json.loads(out.stdout)["nftables"] if "metainfo" not in i]
