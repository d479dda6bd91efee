"""The real backend against the kernel: one table, atomic replacement, fingerprints, namespace handling."""

import json
import os
import subprocess
import time
from dataclasses import replace

import pytest

from egressd.cli import main
from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import CLOSE_GRACE_S, NetnsError, open_netns
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.reconcile.sync import generation_differs, listing_digest
from egressd.ruleset.render import render
from egressd.ruleset.variants import NETNS, Target, create_commands, neutral_name, stage_commands
from tests.integration.conftest import live_name, nft_json
from tests.unit.test_render import CASES

pytestmark = pytest.mark.root


def ruleset(**np):
    return render(parse_sandbox({"id": "x", "network_policy": np}, max_entries=10_000).policy, Config())


def test_other_tables_in_the_namespace_are_left_alone(world, backend):
    sb = world.sandboxes[0]
    world.exec(sb.name, ["nft", "add", "table", "inet", "tenant"])
    world.exec(sb.name, ["nft", "add", "chain", "inet", "tenant", "c"])
    try:
        backend.apply(sb.netns_path, ruleset(deny_out=["203.0.113.0/24"]))
        backend.apply(sb.netns_path, ruleset(deny_out=["198.51.100.0/24"]))
        tables = [i["table"]["name"] for i in nft_json(sb.name, "list", "tables")]
        assert sorted(tables) == ["egressd", "tenant"]
        assert backend.remove(sb.netns_path) is True
        assert [i["table"]["name"] for i in nft_json(sb.name, "list", "tables")] == ["tenant"]
        assert backend.remove(sb.netns_path) is False
    finally:
        world.exec(sb.name, ["nft", "delete", "table", "inet", "tenant"])


def test_fingerprint_is_read_back_from_the_kernel(world, backend):
    sb = world.sandboxes[0]
    rs = ruleset(allow_out=["198.51.100.0/24"])
    assert backend.fingerprint(sb.netns_path) is None
    backend.apply(sb.netns_path, rs)
    assert backend.fingerprint(sb.netns_path) == rs.fingerprint
    chain = nft_json(sb.name, "list", "chain", "inet", "egressd", "fingerprint")
    assert [i["rule"]["comment"] for i in chain if "rule" in i] == [rs.fingerprint]
    backend.remove(sb.netns_path)


def test_a_refused_transaction_leaves_the_old_table_in_force(world, backend):
    sb = world.sandboxes[0]
    good = ruleset(allow_internet_access=False)
    bad_rule = {"add": {"rule": {"family": "inet", "table": "egressd", "chain": "nope", "expr": []}}}
    broken = replace(good, variant=[*good.variant, bad_rule], fingerprint="broken")
    with pytest.raises(ApplyError):
        backend.apply(sb.netns_path, broken)  # no table yet: the whole-table transaction fails
    assert backend.fingerprint(sb.netns_path) is None
    backend.apply(sb.netns_path, good)
    with pytest.raises(ApplyError):
        backend.apply(sb.netns_path, broken)  # the staging transaction fails
    assert backend.fingerprint(sb.netns_path) == good.fingerprint
    assert {neutral_name(n) for n in chain_names(sb.name)} == {
        "output",
        "forward",
        "dns_out",
        "dns_in",
        "input",
        "fingerprint",
        "admit",
        "decide",
        "deny",
        *(c for c in good.chains if c.startswith("log_")),  # the deny steps' logging chains
    }
    assert {c for c in good.chains if c.startswith("log_")} == {
        "log_embedded",
        "log_guard_deny",
        "log_private",
        "log_internet",
    }
    backend.remove(sb.netns_path)


@pytest.mark.parametrize("intercept", [False, True])
def test_tables_of_one_shape_list_alike_and_an_altered_generation_is_found(world, backend, intercept):
    """The digest the reconciler learns from one table of a shape is how every other lists (each policy's
    generation left out: libnftables lists the hooks' check as a prefix match and folds the generation
    into the mark's mask); the generation is compared on its own, and a wider check changes the digest."""
    a, b = world.sandboxes
    config = config_from_dict({"dns": {"intercept": intercept}})

    def shaped(name: str, deny: str):
        policy = {"allow_out": [name], "deny_out": [deny]}
        return render(parse_sandbox({"id": "x", "network_policy": policy}).policy, config)

    one, two = shaped("api.example.com", "203.0.113.1"), shaped("cdn.example.net", "203.0.113.2")
    assert one.shape == two.shape and one.generation != two.generation
    backend.apply(a.netns_path, one)
    backend.apply(b.netns_path, two)
    first, second = backend.read(a.netns_path), backend.read(b.netns_path)
    assert first is not None and second is not None
    assert listing_digest(first) == listing_digest(second)
    assert generation_differs(first, one) is None and generation_differs(second, two) is None
    assert generation_differs(first, two) is not None  # the control: another policy's generation is seen

    def check(mask: int, value: int) -> str:
        """The output hook's first rule replaced by a check of (ct mark & mask) == value."""
        world.exec(a.name, ["nft", "flush", "chain", "inet", "egressd", "output"])
        world.exec(a.name, ["nft", "add", "rule", "inet", "egressd", "output",
                            "ct", "mark", "and", hex(mask), "==", hex(value), "accept"])  # fmt: skip
        world.exec(a.name, ["nft", "add", "rule", "inet", "egressd", "output", "jump", "decide_a"])
        listing = backend.read(a.netns_path)
        assert listing is not None
        return listing

    other = check(0xFFFF0000, two.generation)  # another generation let through: same shape, found apart
    assert listing_digest(other) == listing_digest(first)
    assert generation_differs(other, one) == (
        f"chain output carries generation {two.generation}, not {one.generation}"
    )
    wider = check(0xFF000000, one.generation & 0xFF000000)  # more generations let through: another shape
    assert listing_digest(wider) != listing_digest(first)
    backend.remove(a.netns_path)
    backend.remove(b.netns_path)


def chain_names(ns: str) -> list[str]:
    return [i["chain"]["name"] for i in nft_json(ns, "list", "table", "inet", "egressd") if "chain" in i]


def test_an_update_stages_the_new_policy_then_switches(world, backend):
    """Two transactions: the new policy's sets are committed before any rule reads them."""
    sb = world.sandboxes[0]
    first, second = ruleset(deny_out=["203.0.113.0/24"]), ruleset(deny_out=["198.51.100.0/24"])
    backend.apply(sb.netns_path, first)
    assert live_name(sb.name, "decide") == "decide_a"
    handle = [
        i["table"]["handle"] for i in nft_json(sb.name, "list", "tables") if i["table"]["name"] == "egressd"
    ]
    backend.apply(sb.netns_path, second)
    assert live_name(sb.name, "decide") == "decide_b" and live_name(sb.name, "deny4") == "deny4_b"
    assert sorted(chain_names(sb.name)) == [
        "admit_b", "decide_b", "deny_b", "dns_in", "dns_out", "fingerprint", "forward", "input",
        "log_deny_out_b", "log_embedded_b", "log_guard_deny_b", "log_private_b", "output"
    ]  # fmt: skip
    assert [
        i["table"]["handle"] for i in nft_json(sb.name, "list", "tables") if i["table"]["name"] == "egressd"
    ] == handle
    # an agent that died between the two transactions leaves a staged variant: the next update clears it
    listing = backend.read(sb.netns_path)
    backend.run(sb.netns_path, stage_commands(first, "a"), "stage only")
    backend.apply(sb.netns_path, first, listing=backend.read(sb.netns_path))
    assert (
        live_name(sb.name, "decide") == "decide_a" and backend.fingerprint(sb.netns_path) == first.fingerprint
    )
    assert listing is not None
    backend.remove(sb.netns_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_golden_is_accepted_by_the_kernel(world, backend, name):
    """The goldens are what the renderer promises; the kernel must take each of them as one transaction."""
    path = os.path.join(os.path.dirname(__file__), "..", "golden", f"{name}.json")
    with open(path) as f:
        doc = json.load(f)
    sb = world.sandboxes[0]
    out = subprocess.run(
        ["ip", "netns", "exec", sb.name, "nft", "-j", "-f", "-"],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    backend.remove(sb.netns_path)


def test_ten_thousand_entries_apply_in_one_transaction(world, backend):
    sb = world.sandboxes[0]
    entries = [f"198.18.{i // 256}.{i % 256}" for i in range(5000)] + [
        f"2001:db8:5::{i:x}" for i in range(5000)
    ]
    rs = ruleset(allow_out=entries)
    backend.apply(sb.netns_path, rs)
    listing = nft_json(sb.name, "list", "table", "inet", "egressd")
    sets = {neutral_name(i["set"]["name"]): i["set"] for i in listing if "set" in i}
    # 5000 consecutive /32s collapse into a few prefixes; the v6 ones are not contiguous past ::ff boundaries
    assert sets["allow4"]["elem"] and sets["allow6"]["elem"]
    assert backend.fingerprint(sb.netns_path) == rs.fingerprint
    backend.remove(sb.netns_path)


def test_missing_namespace_is_reported_and_never_created(backend):
    path = "/run/netns/egressd-test-does-not-exist"
    with pytest.raises(NetnsError) as e:
        backend.apply(path, ruleset())
    assert e.value.gone
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "kind, says, gone",
    [
        # An empty file is what `ip netns add` leaves before it mounts the namespace: refused, and waited for.
        ("empty", "no namespace is mounted on it", True),
        ("file", "is a regular file, not a network namespace", False),
        ("dir", "is a directory", False),
        ("host", "is the agent's own (host) network namespace", False),
        ("mnt", "not a network namespace", False),
    ],
)
def test_paths_that_are_not_sandbox_namespaces_are_refused(tmp_path, kind, says, gone):
    if kind in ("empty", "file"):
        path = str(tmp_path / "netns")
        with open(path, "w") as f:
            f.write("" if kind == "empty" else "not a namespace")
    elif kind == "dir":
        path = str(tmp_path)
    elif kind == "host":
        path = f"/proc/{os.getpid()}/ns/net"
    else:
        path = "/proc/self/ns/mnt"
    with pytest.raises(NetnsError) as e:
        open_netns(path)
    assert says in str(e.value) and e.value.gone is gone


def test_a_path_that_now_names_another_namespace_gets_a_fresh_context(world):
    """Delete a namespace and make a new one at the same path: the cached context must not be reused (the
    raw writer's sockets: test_nfnl_sandbox.py)."""
    name = f"{world.prefix}re"
    path = f"/run/netns/{name}"
    backend = LibnftBackend(raw=False)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        first = os.stat(path).st_ino
        backend.apply(path, ruleset(deny_out=["203.0.113.0/24"]))
        assert backend._cache.ident(path).ino == first
        subprocess.run(["ip", "netns", "del", name], check=True)
        subprocess.run(["ip", "netns", "add", name], check=True)
        assert os.stat(path).st_ino != first
        assert backend.fingerprint(path) is None  # a new namespace (read over a socket of its own)
        assert backend.read(path) is None  # no table, and no stale context
        assert backend._cache.ident(path).ino == os.stat(path).st_ino
        rs = ruleset(deny_out=["198.51.100.0/24"])
        backend.apply(path, rs)
        listing = nft_json(name, "list", "chain", "inet", "egressd", "fingerprint")
        assert listing[-1]["rule"]["comment"] == rs.fingerprint
        backend.forget(path)
        assert backend._cache.ident(path) is None
    finally:
        backend.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


def _open_fds(high: bool = False) -> int:
    """Open descriptors below 1024 (libnftables' own), or at 1024 and above (high=True)."""
    return sum((int(fd) >= 1024) == high for fd in os.listdir("/proc/self/fd"))


def test_contexts_are_bounded_and_hold_no_namespace_descriptor(world):
    """libnftables 1.0.6 aborts the process on a socket descriptor >= 1024: descriptors must stay few.
    The raw writers' sockets are bounded too, and kept above 1024."""
    names = [f"{world.prefix}c{i}" for i in range(6)]
    backend = LibnftBackend(context_limit=3, raw_sockets=2)
    before, before_high = _open_fds(), _open_fds(high=True)
    try:
        for n in names:
            subprocess.run(["ip", "netns", "add", n], check=True)
        for _ in range(2):
            for n in names:
                backend.apply(f"/run/netns/{n}", ruleset(deny_out=["203.0.113.0/24"]))
        assert len(backend._cache) == 3
        time.sleep(2 * CLOSE_GRACE_S)  # contexts let go of are freed after the kernel's grace period
        assert _open_fds() - before <= 3  # one netlink socket per cached context, nothing per namespace
        assert _open_fds(high=True) - before_high == 2  # one per kept raw socket
        assert all(backend.fingerprint(f"/run/netns/{n}") is not None for n in names)
    finally:
        backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], check=False)


def test_concurrent_reads_do_not_crash(world):
    """Reading tables from several threads at once aborted the process before calls were serialised."""
    import threading

    names = [f"{world.prefix}t{i}" for i in range(4)]
    backend = LibnftBackend()
    errors: list[str] = []
    try:
        for n in names:
            subprocess.run(["ip", "netns", "add", n], check=True)
            backend.apply(f"/run/netns/{n}", ruleset(allow_out=["198.51.100.0/24", "2001:db8::/48"]))

        def reader(path):
            for _ in range(200):
                listing = backend.read(path) or []
                types = {i["set"]["type"] for i in listing if "set" in i}
                if not types <= {"ipv4_addr", "ipv6_addr"}:
                    errors.append(repr(types))

        threads = [threading.Thread(target=reader, args=(f"/run/netns/{n}",)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
    finally:
        backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], check=False)


def test_cli_apply_is_idempotent(world, tmp_path, capsys):
    sb = world.sandboxes[0]
    f = tmp_path / "sb.json"
    f.write_text(
        json.dumps({"id": "demo", "netns": sb.netns_path, "network_policy": {"deny_out": ["203.0.113.0/24"]}})
    )
    assert main(["apply", str(f)]) == 0
    assert main(["apply", str(f)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"demo: applied in {sb.netns_path}", f"demo: unchanged in {sb.netns_path}"]
    subprocess.run(["ip", "netns", "exec", sb.name, "nft", "delete", "table", "inet", "egressd"], check=True)


def test_what_the_backend_remembers_never_outweighs_the_kernel(world, backend):
    """Updates without a listing use what this backend wrote last; planted or missing objects are handled."""
    sb = world.sandboxes[0]
    first, second = ruleset(deny_out=["203.0.113.0/24"]), ruleset(allow_internet_access=False)
    backend.apply(sb.netns_path, first)
    # someone plants the variant the next update will stage, with an accept-everything rule in it
    world.exec(sb.name, ["nft", "add", "chain", "inet", "egressd", "decide_b"])
    world.exec(sb.name, ["nft", "add", "rule", "inet", "egressd", "decide_b", "accept"])
    backend.apply(sb.netns_path, second)
    decide = [
        i["rule"]["expr"]
        for i in nft_json(sb.name, "list", "chain", "inet", "egressd", "decide_b")
        if "rule" in i
    ]
    assert decide[0] != [{"accept": None}] and decide[-1] == [{"jump": {"target": "log_internet_b"}}]
    # someone deletes the table: the remembered variant is wrong, the apply still lands
    world.exec(sb.name, ["nft", "delete", "table", "inet", "egressd"])
    backend.apply(sb.netns_path, first)
    assert backend.fingerprint(sb.netns_path) == first.fingerprint
    backend.remove(sb.netns_path)


def test_the_kernel_lists_set_elements_as_render_writes_them(netns_name):
    """Digests leave set elements out and reconcile.elements_differ compares them on their own, first as
    text: libnftables must list addresses, prefixes and the catch-alls exactly as render writes them."""
    from egressd.reconcile.sync import elem_key, elements_differ
    from egressd.ruleset.dnsrules import LEARNED_SETS

    path = f"/run/netns/{netns_name}"
    many = [f"198.18.{i // 256}.{i % 256}/32" for i in range(0, 4000, 2)]
    backend = LibnftBackend()
    try:
        for allow in (
            ["192.0.2.1", "198.51.100.0/24", "203.0.113.128/25", "2001:db8::/48", "2001:db8:1::1"],
            ["0.0.0.0/0", "::/0"],
            many,
        ):
            rs = ruleset(allow_out=allow, deny_out=["192.0.2.9", "2001:db8:ffff::/127"])
            backend.apply(path, rs)
            listing = backend.read(path)
            want = rs.elements()
            for item in listing:
                if "set" in item and item["set"]["name"] not in LEARNED_SETS:  # filled by DNS answers only
                    name = neutral_name(item["set"]["name"])
                    have = sorted(elem_key(e) for e in item["set"].get("elem", ()))
                    assert have == sorted(elem_key(e) for e in want[name]), name
            assert elements_differ(listing, rs) is None
    finally:
        backend.close()


def test_contexts_let_go_of_are_freed_after_the_grace_period_and_never_pile_up(world):
    """Freeing a context closes its netlink socket, which waits for an RCU grace period right after a commit
    in its namespace: freeing is deferred by CLOSE_GRACE_S, but never holds more than GRAVEYARD_MAX."""
    import weakref

    from egressd.kernel.netns import GRAVEYARD_MAX, ContextCache

    class Ctx:
        pass

    made: list[weakref.ref] = []

    def factory() -> Ctx:
        ctx = Ctx()
        made.append(weakref.ref(ctx))
        return ctx

    a, b = (sb.netns_path for sb in world.sandboxes[:2])
    cache = ContextCache(factory, limit=1)
    try:
        cache.get(a)
        cache.get(b)  # a's context is let go of ...
        assert made[0]() is not None  # ... but not freed yet
        time.sleep(3 * CLOSE_GRACE_S)
        assert made[0]() is None and made[1]() is not None
        for i in range(GRAVEYARD_MAX + 20):
            cache.get(a if i % 2 == 0 else b)
        assert sum(r() is not None for r in made) <= GRAVEYARD_MAX + 1
    finally:
        cache.close()
    assert all(r() is None for r in made)


def _get_into(cache, path: str, got: dict, i: int, errors: list) -> None:
    try:
        got[i] = cache.get(path)[0]
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_contexts_are_made_side_by_side_and_one_path_keeps_one(world):
    """Making a context (entering the namespace, making its socket) holds no lock: two workers make theirs at
    once (each factory waits for the other at a barrier, which a serialised get() would never reach), and
    two made for one path at once leave one in the cache, the same for both callers, the other let go of."""
    import threading
    import weakref

    from egressd.kernel.netns import ContextCache

    class Ctx:
        pass

    made: list[weakref.ref] = []
    barrier = threading.Barrier(2, timeout=5.0)

    def factory() -> Ctx:
        barrier.wait()
        ctx = Ctx()
        made.append(weakref.ref(ctx))
        return ctx

    a, b = (sb.netns_path for sb in world.sandboxes[:2])
    for paths in ((a, b), (a, a)):
        cache = ContextCache(factory)
        got: dict[int, object] = {}
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_get_into, args=(cache, p, got, i, errors)) for i, p in enumerate(paths)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        try:
            assert errors == [] and len(got) == 2, (paths, errors)
            if paths[0] == paths[1]:
                assert got[0] is got[1]  # one context for the path, both callers use it
                assert cache.get(a)[0] is got[0]
            else:
                assert got[0] is not got[1]
        finally:
            cache.close()
        got.clear()  # the test's own references: only the cache's may be left, and it is closed
        barrier.reset()
    assert len(made) == 4 and all(r() is None for r in made)


def test_a_table_an_older_egressd_wrote_gains_the_interception_chains_on_its_next_update(world, backend):
    """egressd/1 tables had no DNS redirect chains and no learned sets: the update stages them with `add`
    (which leaves what is there alone) before its switch fills them."""
    sb = world.sandboxes[0]
    old = Target(base=NETNS.base[:2], learned=False)  # output and forward only
    before = ruleset(allow_out=["192.0.2.1"])
    out = subprocess.run(
        ["ip", "netns", "exec", sb.name, "nft", "-j", "-f", "-"],
        input=json.dumps({"nftables": create_commands(before, "a", old)}),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(chain_names(sb.name)) == [
        "admit_a",
        "decide_a",
        "deny_a",
        "fingerprint",
        "forward",
        "log_embedded_a",
        "log_guard_deny_a",
        "log_private_a",
        "output",
    ]
    sandbox = parse_sandbox({"id": "x", "network_policy": {"allow_out": ["api.example.com"]}})
    after = render(sandbox.policy, config_from_dict({"dns": {"intercept": True}}))
    assert after.intercept
    backend.apply(sb.netns_path, after, listing=backend.read(sb.netns_path))
    assert backend.fingerprint(sb.netns_path) == after.fingerprint
    assert {"dns_out", "dns_in", "input"} <= set(chain_names(sb.name))
    sets = {
        i["set"]["name"]: i["set"]
        for i in nft_json(sb.name, "list", "table", "inet", "egressd")
        if "set" in i
    }
    assert sets["learned4"]["flags"] == ["timeout"] and sets["learned6"]["type"] == "ipv6_addr"
    dns_out = nft_json(sb.name, "list", "chain", "inet", "egressd", "dns_out")
    assert [r["rule"]["expr"][-1] for r in dns_out if "rule" in r] == [{"redirect": {"port": 153}}]
    backend.remove(sb.netns_path)


def test_a_namespace_without_the_table_is_read_without_a_libnftables_context(world):
    """A new sandbox's first read finds no table over a socket made for that one question: no context made
    (0.4 ms and the lock), and the listing once the table is there."""
    sb = world.sandboxes[0]
    backend = LibnftBackend(raw=True)
    try:
        assert backend.read(sb.netns_path) is None
        assert len(backend._cache) == 0  # no libnftables context was made for it
        backend.apply(sb.netns_path, ruleset(allow_out=["192.0.2.1"]))
        listing = backend.read(sb.netns_path)
        assert listing is not None and any("table" in i for i in listing)
        assert len(backend._cache) == 1  # the listing itself is libnftables'
    finally:
        backend.remove(sb.netns_path)
        backend.close()
