"""A sandbox's namespace deleted while the agent is applying a big table to it, at random moments of a storm.

The namespaces live in a private mount namespace (netns_fixtures.bulk), like the agent, which is started
inside it. "Deleted" is what `ip netns del` does: the bind mount at /run/netns/NAME is detached and the file
unlinked. No process of this test stays in the namespace (every nft or ip command here is short-lived), so
the kernel frees it as soon as nothing else holds it; whether the agent still holds it is reported per
round (a veth pair with one end in a witness namespace: the kernel deletes that end when the namespace
dies) and tested on its own in test_a_deleted_namespace_is_let_go.

How we know a deletion landed in the middle of an apply: the agent runs with a tracer (a sitecustomize
module, TRACER below, put on its PYTHONPATH; it observes, never raises into the agent, and changes no result:
it only holds a worker for STAGE_PAUSE between a staged policy and its switch, so aimed deletions land there)
that records, for every TableSync.sync (one sandbox made equal to its desired state: read the table,
stage transaction, switch transaction, read back), its start and end, its outcome or exception, and each
nftables write on the way (LibnftBackend.run: "staged policy", "switch" or "table", with its start, end
and result). The deletion is done by a helper already running inside the mount namespace (umount2 with
MNT_DETACH, then unlink, as `ip netns del` does), bracketed by our clock to a fraction of a millisecond;
both sides use time.time() on one machine. A sync that committed a write and then failed with NetnsError
was cut by the deletion: it began with the namespace there and ended with it gone. `landed()` says where,
e.g. "during its staged policy transaction ... staged policy:ok, switch:NetnsError": the new variant was
committed into the namespace (the agent's cached context still held it), and the switch found the path
gone. Even rounds delete at a random moment of the storm; odd rounds aim: right after the trace shows the
agent committed a staged policy of the victim. Rounds go on until MIN_CUT were cut (at least MIN_ROUNDS,
at most MAX_ROUNDS), and the test fails if none was. In our runs about half the random rounds and nearly
every aimed one were cut; a sync of the 10,000-entry victim took 0.13-0.9 s on the busy 2-core machine.
The rounds are printed (`-s`), with the seed (EGRESSD_FAULTS_SEED replays the random choices).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.control import request
from egressd.model.config import load_config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from netns_fixtures.bulk import BulkNamespaces
from tests.integration.agent import AgentProcess
from tests.integration.conftest import bulk_table

pytestmark = pytest.mark.root

ENTRIES = 10_000  # allow_out CIDRs of the victim: one sync takes a few hundred ms
BYSTANDERS = 3
MIN_ROUNDS, MAX_ROUNDS, MIN_CUT = 4, 12, 2
STORM_GAP = (0.1, 0.5)  # seconds between two upserts of the victim (parsing one line takes ~0.3 s)
DELETE_AFTER = (0.3, 2.5)  # even rounds: the deletion lands this long after the storm starts
AIM = (0.0, 0.002)  # odd rounds: this long after the agent committed a staged policy of the victim
STAGE_PAUSE = 0.02  # the tracer holds the worker this long after a staged policy, before its switch
STORM_AFTER_DELETE = (0.5, 1.5)  # and the storm goes on this long after the deletion
SETTLE = 60.0  # bound of every wait for the agent to catch up with the feed
LIMITS = f"[limits]\nmax_entries = {2 * ENTRIES}\n"

TRACER = textwrap.dedent(
    """
    # Test-only tracer for egressd (see tests/integration/test_faults.py): observes, changes nothing, and
    # never lets an error of its own reach the agent.
    import inspect, json, os, threading, time

    _path = os.environ.get("EGRESSD_TEST_TRACE")
    _lock = threading.Lock()
    _local = threading.local()

    def _emit(doc):
        try:
            with _lock, open(_path, "a") as f:
                f.write(json.dumps(doc, default=str) + "\\n")
        except Exception:
            pass

    def _arg(sig, name, args, kwargs):
        try:
            return sig.bind(*args, **kwargs).arguments.get(name)
        except TypeError:
            return None

    def _install():
        from egressd.kernel import nft
        from egressd.reconcile import sync as reconcile_sync

        sync = reconcile_sync.TableSync.sync
        sync_sig = inspect.signature(sync)

        def traced_sync(*args, **kwargs):
            netns = _arg(sync_sig, "netns", args, kwargs)
            _local.writes = writes = []
            t0 = time.time()
            _emit({"netns": netns, "start": t0})
            try:
                result = sync(*args, **kwargs)
            except BaseException as e:
                _emit({"netns": netns, "t0": t0, "t1": time.time(), "writes": writes,
                       "error": type(e).__name__, "reason": str(e)})
                raise
            _emit({"netns": netns, "t0": t0, "t1": time.time(), "writes": writes,
                   "outcome": getattr(result, "outcome", None)})
            return result

        reconcile_sync.TableSync.sync = traced_sync
        hooked = {"TableSync.sync": list(sync_sig.parameters)}
        run = getattr(nft.LibnftBackend, "run", None)
        if run is not None:
            run_sig = inspect.signature(run)

            def traced_run(*args, **kwargs):
                writes = getattr(_local, "writes", None)
                what = _arg(run_sig, "what", args, kwargs)
                t0 = time.time()
                try:
                    out = run(*args, **kwargs)
                except BaseException as e:
                    if writes is not None:
                        writes.append([what, t0, time.time(), type(e).__name__])
                    raise
                t = time.time()
                if writes is not None:
                    writes.append([what, t0, t, "ok"])
                _emit({"netns": _arg(run_sig, "netns", args, kwargs), "wrote": what, "t": t})
                if what == "staged policy":
                    # The one thing the tracer does besides observing: it holds the worker between a
                    # committed staged policy and its switch for a moment, so an aimed deletion can land
                    # there (raw writes made that gap a fraction of a millisecond). No result changes.
                    time.sleep(float(os.environ.get("EGRESSD_TEST_STAGE_PAUSE", "0")))
                return out

            nft.LibnftBackend.run = traced_run
            hooked["LibnftBackend.run"] = list(run_sig.parameters)
        _emit({"tracer": "installed", "hooked": hooked})

    if _path:
        try:
            _install()
        except Exception as e:
            _emit({"tracer": "unavailable", "error": repr(e)})
    """
)


def allow_list(rev: int) -> list[str]:
    """ENTRIES distinct, non-adjacent IPv4 addresses of 198.18.0.0/15, a different window per revision."""
    base = int(ipaddress.ip_address("198.18.0.0"))
    off = rev * 7919
    return [str(ipaddress.ip_address(base + 2 * ((off + j) % 65536))) for j in range(ENTRIES)]


def victim_record(rev: int) -> dict[str, Any]:
    return {
        "id": "victim",
        "netns": BulkNamespaces.path("victim"),
        "revision": rev,
        "network_policy": {"allow_internet_access": False, "allow_out": allow_list(rev)},
    }


def bystander_record(i: int) -> dict[str, Any]:
    return {
        "id": f"by{i}",
        "netns": BulkNamespaces.path(f"by{i}"),
        "revision": 1,
        "network_policy": {"allow_internet_access": False, "deny_out": [f"203.0.113.{i + 1}"]},
    }


def fingerprint_in(listing: list[dict[str, Any]] | None) -> str | None:
    for item in listing or ():
        rule = item.get("rule", {})
        if rule.get("chain") == "fingerprint":
            return rule.get("comment")
    return None


def allowed_in(listing: list[dict[str, Any]]) -> set[str]:
    return {
        str(e)
        for item in listing
        if item.get("set", {}).get("name", "") in ("allow4_a", "allow4_b")
        for e in item["set"].get("elem", ())
    }


def rows(a: AgentProcess) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in request(a.socket, {"cmd": "status"}, timeout=30)["sandboxes"]}


def wait_for(check, timeout: float, what: str, a: AgentProcess, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        assert a.proc is not None and a.proc.poll() is None, (
            f"the agent died ({what}):\n{a.log_path.read_text()[-3000:]}"
        )
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(poll)


def trace(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TraceTail:
    """The trace as it grows, read from where the last look stopped (polled every few ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def victim_syncs(path: Path) -> list[dict[str, Any]]:
    """The victim's finished syncs, as the tracer saw them."""
    return [s for s in trace(path) if s.get("netns") == BulkNamespaces.path("victim") and "t1" in s]


def landed(sync: dict[str, Any], t_del0: float, t_del1: float) -> str:
    """Where a deletion (between t_del0 and t_del1) fell in a sync that overlapped it, from the trace.

    Each write is [what, start, end, result]; egressd checks the path at the start of each netlink call, so
    a write that began before the deletion commits into the namespace (its context holds it) and the next
    call is refused."""
    steps = ", ".join(f"{w[0]}:{w[3]}" for w in sync["writes"]) or "no write"
    whole = f"{round((sync['t1'] - sync['t0']) * 1000)} ms sync: {steps}; ended {sync.get('outcome') or sync.get('error')}"
    done = [w for w in sync["writes"] if w[3] == "ok"]
    if not done:
        return f"before its first write, in a {whole}"
    last = done[-1]
    if t_del0 < last[2]:
        return f"during its {last[0]} transaction, in a {whole}"
    return f"{round((t_del0 - last[2]) * 1000, 1)} ms after its {last[0]} committed, in a {whole}"


def cut(sync: dict[str, Any]) -> bool:
    """The sync committed a write, then found the namespace gone: the deletion landed inside the apply."""
    return sync.get("error") == "NetnsError" and any(w[3] == "ok" for w in sync["writes"])


def staged(records: list[dict[str, Any]]) -> bool:
    """Whether the agent committed a staged policy of the victim in these trace records."""
    victim = BulkNamespaces.path("victim")
    return any(r.get("netns") == victim and r.get("wrote") == "staged policy" for r in records)


def tie_to_witness(bulk: BulkNamespaces, ifname: str) -> None:
    """A veth pair from the victim to the witness namespace; the witness end is called ifname."""
    bulk.run_inside(f"ip -n victim link add v0 type veth peer name {ifname} netns witness".split())


def witness_alive(bulk: BulkNamespaces, ifname: str) -> bool:
    """Whether the witness end of the victim's veth is still there: it goes when the victim's namespace dies."""
    return bulk.exec("witness", ["ip", "link", "show", ifname], check=False).returncode == 0


class Storm:
    """A thread appending upserts of the victim, each a new revision with a different 10,000-entry list."""

    def __init__(self, a: AgentProcess, rev: int, gap: float) -> None:
        self.a, self.rev, self.gap = a, rev, gap
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: OSError | None = None

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.a.send({"type": "upsert", "sandbox": victim_record(self.rev + 1)})
                self.rev += 1
                self.stop.wait(self.gap)
        except OSError as e:  # reported by the test
            self.error = e

    def __enter__(self) -> Storm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def bulk():
    with BulkNamespaces() as b:
        yield b


@pytest.fixture
def traced_agent(bulk, tmp_path):
    tracer_dir = tmp_path / "tracer"
    tracer_dir.mkdir()
    (tracer_dir / "sitecustomize.py").write_text(TRACER)
    trace_path = tmp_path / "trace.ndjson"
    a = AgentProcess(
        tmp_path / "agent",
        wrap=bulk.wrap(),
        extra_config=LIMITS,
        env={
            "PYTHONPATH": str(tracer_dir),
            "EGRESSD_TEST_TRACE": str(trace_path),
            "EGRESSD_TEST_STAGE_PAUSE": str(STAGE_PAUSE),
        },
    )
    yield a, trace_path
    a.stop()


def test_a_namespace_deleted_in_the_middle_of_an_apply(bulk, traced_agent):
    a, trace_path = traced_agent
    seed = os.environ.get("EGRESSD_FAULTS_SEED", str(time.time_ns()))
    print(f"\nEGRESSD_FAULTS_SEED={seed}")
    rng = random.Random(seed)
    bulk.create(["victim", "witness", *(f"by{i}" for i in range(BYSTANDERS))])
    a.start()
    hooks = trace(trace_path)[0]
    assert hooks.get("tracer") == "installed", f"the tracer could not hook into egressd: {hooks}"
    assert "netns" in hooks["hooked"]["TableSync.sync"], f"update TRACER to egressd's code: {hooks}"
    assert "what" in hooks["hooked"].get("LibnftBackend.run", ["what"]), f"update TRACER: {hooks}"
    config = load_config(a.config_path)

    def expected(rev: int) -> str:
        return render(parse_sandbox(victim_record(rev), max_entries=2 * ENTRIES).policy, config).fingerprint

    for i in range(BYSTANDERS):
        a.send({"type": "upsert", "sandbox": bystander_record(i)})
    rev = 1
    a.send({"type": "upsert", "sandbox": victim_record(rev)})
    for sid in ["victim", *(f"by{i}" for i in range(BYSTANDERS))]:
        assert a.wait(sid, 1, timeout=SETTLE)
    bystanders = {f"by{i}": bulk_table(bulk, f"by{i}") for i in range(BYSTANDERS)}
    assert all(fingerprint_in(t) for t in bystanders.values())

    report = []
    for k in range(MAX_ROUNDS):
        if k >= MIN_ROUNDS and sum(r["cut"] for r in report) >= MIN_CUT:
            break
        # The victim is enforced; a veth pair ties it to the witness namespace, to see when it dies.
        veth = f"w{k}"
        tie_to_witness(bulk, veth)
        gap, delay = rng.uniform(*STORM_GAP), rng.uniform(*DELETE_AFTER)
        aimed = k % 2 == 1
        with Storm(a, rev, gap) as storm:
            if aimed:
                # Odd rounds aim: right after the agent committed the first transaction of an apply of
                # the victim (seen in the trace), before or while it goes on with the switch.
                tail = TraceTail(trace_path)
                wait_for(lambda t=tail: staged(t.new()), SETTLE, "a staged policy of the victim", a, 0.001)
                delay = rng.uniform(*AIM)
            time.sleep(delay)
            t_del0 = time.time()
            bulk.detach("victim")  # umount2(MNT_DETACH) + unlink, by a helper already in place: ~0.1 ms
            t_del1 = time.time()
            assert not bulk.exists("victim")
            time.sleep(rng.uniform(*STORM_AFTER_DELETE))  # updates for a namespace that is gone
        assert storm.error is None, storm.error
        rev = storm.rev

        # The agent lives, and says the victim is not enforced, and why, for the latest revision it read.
        def settled_missing(rev=rev):
            row = rows(a)["victim"]
            return row["revision"] == rev and row["state"] in ("pending", "error") and row

        row = wait_for(settled_missing, SETTLE, f"victim pending at revision {rev}", a)
        assert any(why in (row["error"] or "") for why in ("does not exist", "namespace")), row
        time.sleep(1.0)  # ... and goes on saying so: nothing is in force at a path that names no namespace
        row = rows(a)["victim"]
        assert row["state"] in ("pending", "error") and row["revision"] == rev, row

        # The others are untouched: enforced, no write since their first, the same table in the kernel.
        status = rows(a)
        for sid, listing in bystanders.items():
            assert (status[sid]["state"], status[sid]["writes"]) == ("enforced", 1), status[sid]
            assert bulk_table(bulk, sid) == listing, f"{sid} changed"
        freed = not witness_alive(bulk, veth)

        # Where the deletion landed: inside a sync of the victim? Between two of its transactions?
        overlapping = [s for s in victim_syncs(trace_path) if s["t0"] <= t_del1 and s["t1"] >= t_del0]
        where = [landed(s, t_del0, t_del1) for s in overlapping] or ["no sync of the victim overlapped"]
        was_cut = any(cut(s) for s in overlapping)

        # A new namespace at the same path: the latest revision is enforced there, whole.
        t_new = time.monotonic()
        bulk.create(["victim"])
        assert a.wait("victim", rev, timeout=SETTLE), rows(a)["victim"]
        listing = bulk_table(bulk, "victim")
        assert fingerprint_in(listing) == expected(rev)
        assert allowed_in(listing) == set(allow_list(rev))
        report.append(
            {
                "round": k,
                "aimed": aimed,
                "gap_s": round(gap, 2),
                "delete_after_s": round(delay, 2),
                "last_revision": rev,
                "landed": where,
                "cut": was_cut,
                "status_error": row["error"],
                "enforced_again_s": round(time.monotonic() - t_new, 2),
                "old_namespace_freed_before_recreate": freed,
            }
        )
    print("rounds:\n" + "\n".join(json.dumps(r) for r in report))
    assert any(r["cut"] for r in report), "no deletion landed inside an apply"
    assert a.stop() == 0
    logged = {e.get("event") for e in a.logs()}
    assert "reconcile_bug" not in logged and "unparsed" not in logged, "the agent logged a bug or a traceback"


def test_a_deleted_namespace_is_let_go(bulk, tmp_path):
    """A namespace deleted under a sandbox the agent still knows must die: nothing of the agent may hold it
    (its veth pair, addresses and sockets would live on, and the platform could not reuse their names).
    Neither its cached libnftables context nor its change monitor's socket, well before the resync."""
    bulk.create(["victim", "witness"])
    a = AgentProcess(tmp_path / "agent", wrap=bulk.wrap(), resync_interval=30)
    try:
        a.start()
        a.upsert("victim", BulkNamespaces.path("victim"), 1, allow_internet_access=False)
        assert a.wait("victim", 1)
        tie_to_witness(bulk, "w0")
        assert witness_alive(bulk, "w0")
        bulk.delete(["victim"])
        wait_for(lambda: rows(a)["victim"]["state"] == "pending", 10, "victim pending", a)
        deadline = time.monotonic() + 10  # the agent checks every namespace path every second
        while witness_alive(bulk, "w0") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not witness_alive(bulk, "w0"), "the deleted namespace is still alive, held by the agent"
    finally:
        a.stop()


def test_a_namespace_replaced_at_the_same_path_is_enforced_there_soon(bulk, tmp_path):
    """The platform deletes a sandbox's namespace and makes a new one at the same path (a restart, a
    restore), with no new record: the new one gets its table within seconds, not at the next resync."""
    bulk.create(["sb"])
    a = AgentProcess(tmp_path / "agent", wrap=bulk.wrap(), resync_interval=30)
    try:
        a.start()
        a.upsert("sb", BulkNamespaces.path("sb"), 1, allow_internet_access=False)
        assert a.wait("sb", 1)
        written = fingerprint_in(bulk_table(bulk, "sb"))
        assert written
        bulk.detach("sb")
        bulk.create(["sb"])
        deadline = time.monotonic() + 5  # the agent looks for missing namespaces every second
        while bulk_table(bulk, "sb") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert bulk_table(bulk, "sb") is not None, f"no table in the new namespace; status {rows(a)['sb']}"
        assert fingerprint_in(bulk_table(bulk, "sb")) == written
    finally:
        a.stop()


def test_a_namespace_seen_while_it_is_being_made_is_enforced_at_once(bulk, tmp_path):
    """`ip netns add` (and CNI's ns.NewNS) first creates an empty file at /run/netns/NAME, then bind-mounts
    the new namespace on it; `ip netns del` unmounts, then unlinks. An agent looking in between must keep
    waiting (pending, looked for every second), not back off as for a bad path."""
    bulk.create(["donor"])
    a = AgentProcess(tmp_path / "agent", wrap=bulk.wrap())
    # The defaults of [reconcile] (retry_initial 0.2 s, retry_max 30 s), not the tests' short ones.
    a.config_path.write_text(a.config_path.read_text().replace("retry_initial = 0.05\nretry_max = 0.5\n", ""))
    assert "retry_max" not in a.config_path.read_text()
    late = BulkNamespaces.path("late")
    try:
        a.start()
        a.upsert("late", late, 1, allow_internet_access=False)
        time.sleep(4)  # pending, looked for every second
        assert rows(a)["late"]["state"] == "pending"
        bulk.run_inside(["touch", late])  # the mount point, for a moment longer than `ip` leaves it
        time.sleep(1.5)
        bulk.run_inside(["mount", "--bind", BulkNamespaces.path("donor"), late])
        assert a.wait("late", 1, timeout=3), rows(a)["late"]
    finally:
        a.stop()
