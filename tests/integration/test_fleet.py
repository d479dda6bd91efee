"""The fleet feed end to end: a real nats-server with JetStream on loopback, a real agent, real packets.

Every key is `<host_id>.<sandbox_id>` in the bucket `egressd-sandboxes`; the KV revision is the record's
revision, so `egressd wait` is asked for exactly the revision the put returned.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time

import nkeys
import pytest

from netns_fixtures.probe import ping
from tests.integration.conftest import nft_table
from tests.integration.test_agent import (
    BAD4,
    BAD6,
    OK4,
    OK6,
    OTHER4,
    closed_to,
    eventually,
    open_to,
)
from tests.loopback import free_port, scrape
from tests.natsd import KvClient, NatsServer

pytestmark = pytest.mark.root


def record(sb, *, internet: bool = False, allow=(), deny=()) -> dict:
    return {
        "netns": sb.netns_path,
        "network_policy": {
            "allow_internet_access": internet,
            "allow_out": list(allow),
            "deny_out": list(deny),
        },
    }


@pytest.fixture
def nats(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kv(nats):
    with KvClient(nats.url) as client:
        yield client


def fleet_agent(agent, url: str, host_id: str = "hosta", extra: str = "", **kw):
    return agent(feed=url, feed_config=f'[feed.nats]\nhost_id = "{host_id}"\n{extra}', **kw)


def feed_health(a) -> dict:
    return a.agent_status()["feed"]


def applied_revisions(a, sid: str) -> list[int]:
    return [e["revision"] for e in a.events("applied") if e.get("sandbox") == sid]


def test_create_update_delete_and_purge_through_the_bucket(world, agent, kv, nats):
    sb = world.sandboxes[0]
    a = fleet_agent(agent, nats.url).start()
    r1 = kv.put("hosta.s0", record(sb, allow=[OK4, OK6]))
    assert a.wait("s0", r1)
    assert a.status()["s0"]["revision"] == r1
    assert open_to(sb.name, OK4) and open_to(sb.name, OK6)
    assert closed_to(sb.name, OTHER4) and closed_to(sb.name, BAD6)
    r2 = kv.put("hosta.s0", record(sb, allow=[OTHER4]))  # update: OK4 out, OTHER4 in
    assert r2 > r1 and a.wait("s0", r2)
    assert open_to(sb.name, OTHER4) and closed_to(sb.name, OK4) and closed_to(sb.name, OK6)
    kv.delete("hosta.s0")
    assert eventually(lambda: "s0" not in a.status())
    assert nft_table(sb.name) is None
    assert open_to(sb.name, BAD4) and open_to(sb.name, BAD6)
    r3 = kv.put("hosta.s0", record(sb))  # back, closed
    assert a.wait("s0", r3)
    assert closed_to(sb.name, OK4)
    kv.purge("hosta.s0")  # a purge is a delete too
    assert eventually(lambda: "s0" not in a.status())
    assert open_to(sb.name, OK4)
    h = feed_health(a)
    assert h["connected"] == 1 and h["bucket"] == "egressd-sandboxes" and h["host_id"] == "hosta"
    assert h["snapshots"] == 1 and h["revision"] >= r3 and h["keys"] == 0


def test_two_hosts_watching_one_bucket_each_enforce_only_their_own_keys(world, agent, kv, nats):
    s0, s1 = world.sandboxes
    a = fleet_agent(agent, nats.url, "hosta").start()
    b = fleet_agent(agent, nats.url, "hostb").start()
    ra = kv.put("hosta.s0", record(s0, allow=[OK4]))
    rb = kv.put("hostb.s1", record(s1, allow=[OTHER4]))
    assert a.wait("s0", ra) and b.wait("s1", rb)
    # host b's key names host a's sandbox namespace: host a must never see it, host b's own check refuses
    # nothing because it is not a's business; each agent lists exactly its own
    assert set(a.status()) == {"s0"} and set(b.status()) == {"s1"}
    assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)
    assert open_to(s1.name, OTHER4) and closed_to(s1.name, OK4)
    kv.delete("hostb.s1")
    assert eventually(lambda: "s1" not in b.status())
    assert open_to(s1.name, OK4)
    assert a.status()["s0"]["revision"] == ra and closed_to(s0.name, OTHER4)  # untouched by b's change
    assert feed_health(a)["keys"] == 1 and feed_health(b)["keys"] == 0


def test_server_down_while_keys_change_converges_to_the_latest_values(world, agent, kv, nats, tmp_path):
    s0, s1 = world.sandboxes
    port = free_port()
    a = fleet_agent(
        agent, nats.url, extra="retry_initial = 0.2\nretry_max = 0.5\n",
        extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    ).start()  # fmt: skip
    r1 = kv.put("hosta.s0", record(s0, allow=[OK4]))
    kv.put("hosta.s1", record(s1))
    assert a.wait("s0", r1) and a.wait("s1")
    nats.stop()
    assert eventually(lambda: feed_health(a)["connected"] == 0, timeout=10)
    h = feed_health(a)
    assert h["disconnects"] == 1 and "retrying" in h["last_error"]
    assert scrape(port)[("egressd_feed_connected", ())] == 0.0
    assert scrape(port)[("egressd_feed_disconnects_total", ())] == 1.0
    # Right after the loss it says so; from the first retry on, why the server cannot be reached.
    assert "feed: NOT connected, enforcing the last known state: " in a.cli("status").stdout
    assert eventually(lambda: "last known state: cannot reach the server" in a.cli("status").stdout)
    # Enforcement goes on while the bus is down.
    assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4) and closed_to(s1.name, OK4)
    # The same store served on another port: the control plane writes while this agent cannot connect.
    other = NatsServer(tmp_path / "nats", port=free_port()).start()
    try:
        with KvClient(other.url, create=False) as writer:
            r2 = writer.put("hosta.s0", record(s0, allow=[OK4, OTHER4]))
            r3 = writer.put("hosta.s0", record(s0, allow=[OTHER4]))  # written twice: only this one counts
            writer.delete("hosta.s1")
            r4 = writer.put("hosta.s2", record(s1, allow=[OK6]))  # a new sandbox in s1's namespace
    finally:
        other.stop()
    nats.start()
    assert a.wait("s0", r3, timeout=15) and a.wait("s2", r4, timeout=15)
    assert eventually(lambda: "s1" not in a.status())
    assert r2 not in applied_revisions(a, "s0"), "a value overwritten while away must never be applied"
    assert applied_revisions(a, "s0") == [r1, r3]
    assert open_to(s0.name, OTHER4) and closed_to(s0.name, OK4)
    assert open_to(s1.name, OK6) and closed_to(s1.name, OK4)
    assert eventually(lambda: feed_health(a)["connected"] == 1)
    assert feed_health(a)["snapshots"] == 2 and feed_health(a)["last_error"] is None
    assert scrape(port)[("egressd_feed_connected", ())] == 1.0
    assert (
        "feed: following hosta.* in bucket egressd-sandboxes on nats://127.0.0.1:" in a.cli("status").stdout
    )
    assert scrape(port)[("egressd_feed_revision", ())] >= r4


def test_agent_restarted_while_the_server_holds_changes_it_has_not_seen(world, agent, kv, nats):
    s0, s1 = world.sandboxes
    a = fleet_agent(agent, nats.url).start()
    r1 = kv.put("hosta.s0", record(s0, allow=[OK4]))
    kv.put("hosta.s1", record(s1))
    assert a.wait("s0", r1) and a.wait("s1")
    a.stop()
    r2 = kv.put("hosta.s0", record(s0, allow=[OTHER4]))
    kv.delete("hosta.s1")
    r3 = kv.put("hosta.s2", {"netns": s1.netns_path, "network_policy": {"allow_internet_access": True}})
    assert closed_to(s0.name, OTHER4), "the old table stays in force while the agent is down"
    a.start()
    assert a.wait("s0", r2) and a.wait("s2", r3)
    assert "s1" not in a.status()
    assert open_to(s0.name, OTHER4) and closed_to(s0.name, OK4)
    assert nft_table(s1.name) is not None and open_to(s1.name, OK4)  # s2's own table: internet allowed


def test_agent_started_while_the_server_is_down_enforces_its_persisted_state(world, agent, kv, nats):
    s0 = world.sandboxes[0]
    a = fleet_agent(agent, nats.url, extra="retry_initial = 0.2\nretry_max = 0.5\n").start()
    r1 = kv.put("hosta.s0", record(s0, allow=[OK4]))
    assert a.wait("s0", r1)
    a.stop()
    nats.stop()
    world.exec(s0.name, ["nft", "delete", "table", "inet", "egressd"])  # a host reboot, say
    t0 = time.monotonic()
    a.start()  # READY without the server, from the state file
    assert time.monotonic() - t0 < 10
    assert a.wait("s0", r1)
    assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)
    h = feed_health(a)
    assert h["connected"] == 0 and "cannot reach the server" in h["last_error"]
    nats.start()
    assert eventually(lambda: feed_health(a)["connected"] == 1, timeout=10)
    kv.wait_connected()
    r2 = kv.put("hosta.s0", record(s0, allow=[OTHER4]))
    assert a.wait("s0", r2)
    assert open_to(s0.name, OTHER4) and closed_to(s0.name, OK4)


def test_a_bucket_made_anew_is_noticed_and_read_again(world, agent, kv, nats):
    s0, s1 = world.sandboxes
    a = fleet_agent(agent, nats.url).start()
    kv.put("hosta.s1", record(s1))
    for _ in range(3):
        old = kv.put("hosta.s0", record(s0, allow=[OK4]))
    assert a.wait("s0", old) and a.wait("s1")
    assert closed_to(s1.name, OK4)  # s1's table is there before the new bucket forgets it
    kv.recreate()  # the watch goes quiet; the agent notices within BUCKET_CHECK_INTERVAL (10 s)
    for i in range(old + 2):  # more revisions than before: only the bucket's creation time tells
        kv.put(f"hostz.k{i}", record(s1))
    new = kv.put("hosta.s0", record(s0, allow=[OTHER4]))
    assert new > old
    assert eventually(lambda: a.status().get("s0", {}).get("revision") == new, timeout=25)
    assert a.wait("s0", new)
    assert eventually(lambda: "s1" not in a.status())
    assert open_to(s0.name, OTHER4) and closed_to(s0.name, OK4) and open_to(s1.name, OK4)
    assert any("made anew" in (e.get("error") or "") for e in a.events("feed_problem"))
    later = kv.put("hosta.s0", record(s0, allow=[OK4]))  # and followed from there on
    assert a.wait("s0", later) and open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)


def test_malformed_values_are_rejected_with_the_key_and_entry_named(world, agent, kv, nats):
    s0, s1 = world.sandboxes
    a = fleet_agent(agent, nats.url).start()
    good = kv.put("hosta.s0", record(s0, allow=[OK4]))
    assert a.wait("s0", good)
    # A known sandbox keeps its last good policy.
    bad_entry = kv.put("hosta.s0", record(s0, allow=[OK4, "10.0.0.0/33"]))
    [rej] = a.wait_log("feed_line_rejected", key="hosta.s0")
    assert rej["revision"] == bad_entry and rej["sandbox"] == "s0"
    assert "network_policy.allow_out[1] '10.0.0.0/33'" in rej["error"]
    assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)
    assert a.status()["s0"]["revision"] == good
    # A new sandbox with a broken value is closed in the namespace its record names, never opened.
    bad_new = kv.put("hosta.s1", record(s1, internet=True, deny=["not a host name!"]))
    [rej] = a.wait_log("feed_line_rejected", key="hosta.s1")
    assert rej["revision"] == bad_new and "network_policy.deny_out[0] 'not a host name!'" in rej["error"]
    assert eventually(lambda: a.status().get("s1", {}).get("state") == "error")  # closed, never "enforced"
    assert eventually(lambda: closed_to(s1.name, OK4))
    not_json = kv.put("hosta.s1", b"{not json")
    [*_, rej] = a.wait_log("feed_line_rejected", key="hosta.s1", count=2)
    assert rej["revision"] == not_json and "not a JSON record" in rej["error"]
    kv.put("hosta.s1", json.dumps([1, 2]))
    assert a.wait_log("feed_line_rejected", key="hosta.s1", count=3)[-1]["error"].endswith("not list")
    mismatch = kv.put("hosta.s1", {"id": "s9", **record(s1, internet=True)})
    [*_, rej] = a.wait_log("feed_line_rejected", key="hosta.s1", count=4)
    assert rej["revision"] == mismatch and "the record's id 's9' is not the key's" in rej["error"]
    assert a.status()["s1"]["state"] == "error" and a.status()["s1"]["netns"] == s1.netns_path
    kv.put("hosta.-x", record(s1, internet=True))  # a key that cannot name a sandbox
    [rej] = a.wait_log("feed_line_rejected", key="hosta.-x")
    assert "sandbox id '-x' is not valid" in rej["error"] and rej.get("sandbox") is None
    assert closed_to(s1.name, OK4)
    h = feed_health(a)
    assert h["values_rejected"] == 6 and "hosta.-x" in h["last_error"]
    # A fixed value takes over; a snapshot after a reconnect does not trip over the bad key.
    fixed = kv.put("hosta.s1", record(s1, allow=[OK6]))
    assert a.wait("s1", fixed) and open_to(s1.name, OK6)
    assert a.status()["s0"]["revision"] == good and "rejected" in (a.status()["s0"].get("error") or "")


def _certificates(d, ca_key_usage: bool = True) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl as docs/fleet.md says (what
    strict verification needs); ca_key_usage=False leaves the CA's keyUsage out, as many operators' CAs do."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    usage = ["-addext", "keyUsage=critical,keyCertSign,cRLSign"] if ca_key_usage else []
    openssl(
        "req", "-x509", *ec, "-days", "1", "-subj", "/CN=egressd test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", *usage, "-keyout", "ca.key", "-out", "ca.pem",
    )  # fmt: skip
    openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    ids = (
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\nkeyUsage=critical,digitalSignature\n"
    )
    (d / "san.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n{ids}")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
    )  # fmt: skip
    # A client certificate from the same CA, for a server that verifies its clients.
    openssl("req", *ec, "-subj", "/CN=egressd", "-keyout", "client.key", "-out", "client.csr")
    (d / "client.ext").write_text(f"extendedKeyUsage=clientAuth\n{ids}")
    openssl(
        "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "client.ext", "-out", "client.pem",
    )  # fmt: skip
    names = {"ca": "ca.pem", "cert": "server.pem", "key": "server.key", "client": "client.pem"}
    return {k: str(d / f) for k, f in names.items()} | {"client_key": str(d / "client.key")}


def _user_nkey(path) -> str:
    """A new NKey user: its seed written to path (as an operator would), its public key returned."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return nkeys.from_seed(seed).public_key.decode()


def test_tls_and_nkey_authentication(world, agent, tmp_path):
    s0 = world.sandboxes[0]
    certs = _certificates(tmp_path / "pki")
    seed = tmp_path / "egressd.nk"
    public = _user_nkey(seed)
    conf = (
        f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'
        f'tls {{ cert_file: "{certs["cert"]}", key_file: "{certs["key"]}" }}\n'
    )
    options = {"tls": ssl.create_default_context(cafile=certs["ca"]), "nkeys_seed": str(seed)}
    server = NatsServer(tmp_path / "nats", config=conf, client_options=options).start()
    url = f"tls://127.0.0.1:{server.port}"
    try:
        with KvClient(url, options=options) as kv:
            a = fleet_agent(agent, url, extra=f'nkey = "{seed}"\ntls_ca = "{certs["ca"]}"\n').start()
            r1 = kv.put("hosta.s0", record(s0, allow=[OK4]))
            assert a.wait("s0", r1)
            assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)
            assert feed_health(a)["connected"] == 1
            # Without the key the server refuses the agent; with another CA the agent refuses the server.
            # Neither opens anything: both agents wait, retrying, and say why.
            other_ca = _certificates(tmp_path / "other-pki")["ca"]
            no_key = fleet_agent(agent, url, "hostb", extra=f'tls_ca = "{certs["ca"]}"\n').start()
            wrong_ca = fleet_agent(
                agent, url, "hostc", extra=f'nkey = "{seed}"\ntls_ca = "{other_ca}"\n'
            ).start()
            assert eventually(lambda: "credentials" in (feed_health(no_key)["last_error"] or ""), timeout=10)
            assert eventually(
                lambda: "TLS certificate is not trusted" in (feed_health(wrong_ca)["last_error"] or "")
            )
            assert feed_health(no_key)["connected"] == 0 and feed_health(wrong_ca)["connected"] == 0
    finally:
        server.stop()


def test_a_ca_without_key_usage_is_refused_and_the_error_says_what_a_ca_needs(world, agent, tmp_path):
    """Strict verification on every release: this CA works with Python 3.11's defaults and not with 3.13's,
    so egressd refuses it on both, and says what to reissue."""
    certs = _certificates(tmp_path / "pki", ca_key_usage=False)
    conf = f'tls {{ cert_file: "{certs["cert"]}", key_file: "{certs["key"]}" }}\n'
    lenient = ssl.create_default_context(cafile=certs["ca"])
    lenient.verify_flags &= ~ssl.VERIFY_X509_STRICT  # only for the fixture's own readiness check
    server = NatsServer(tmp_path / "nats", config=conf, client_options={"tls": lenient}).start()
    try:
        a = fleet_agent(agent, f"tls://127.0.0.1:{server.port}", extra=f'tls_ca = "{certs["ca"]}"\n').start()
        assert eventually(lambda: "verified strictly" in (feed_health(a)["last_error"] or ""), timeout=10)
        error = feed_health(a)["last_error"]
        assert "CA cert does not include key usage extension" in error
        assert "keyUsage critical keyCertSign, cRLSign" in error and feed_health(a)["connected"] == 0
    finally:
        server.stop()


def test_tls_with_a_client_certificate(world, agent, tmp_path):
    """A server that verifies its clients: the agent's tls_cert and tls_key get it in; without them it is
    refused and says so, and nothing opens."""
    s0 = world.sandboxes[0]
    certs = _certificates(tmp_path / "pki")
    conf = (
        f'tls {{ cert_file: "{certs["cert"]}", key_file: "{certs["key"]}", '
        f'ca_file: "{certs["ca"]}", verify: true }}\n'
    )
    ctx = ssl.create_default_context(cafile=certs["ca"])
    ctx.load_cert_chain(certs["client"], certs["client_key"])
    server = NatsServer(tmp_path / "nats", config=conf, client_options={"tls": ctx}).start()
    url = f"tls://127.0.0.1:{server.port}"
    try:
        with KvClient(url, options={"tls": ctx}) as kv:
            mtls = f'tls_ca = "{certs["ca"]}"\ntls_cert = "{certs["client"]}"\ntls_key = "{certs["client_key"]}"\n'
            a = fleet_agent(agent, url, extra=mtls).start()
            r1 = kv.put("hosta.s0", record(s0, allow=[OK4]))
            assert a.wait("s0", r1)
            assert open_to(s0.name, OK4) and closed_to(s0.name, OTHER4)
            no_cert = fleet_agent(agent, url, "hostb", extra=f'tls_ca = "{certs["ca"]}"\n').start()
            # the server's alert ("refused our TLS client certificate", check tls_cert, tls_key) or, when
            # TLS 1.3 delivers the refusal as a lost connection, the hint to set them: either way, the keys
            refused = ("tls_cert", "tls_key")
            assert eventually(
                lambda: all(k in (feed_health(no_cert)["last_error"] or "") for k in refused), 10
            )
            assert feed_health(no_cert)["connected"] == 0 and feed_health(no_cert)["snapshots"] == 0
    finally:
        server.stop()


def test_denials_are_published_on_the_hosts_subject(world, agent, kv, nats):
    """docs/denials.md: with the fleet feed each denial event also goes to egressd.denials.<host_id>."""
    sb = world.sandboxes[0]
    got = kv.subscribe("egressd.denials.hosta")
    a = fleet_agent(agent, nats.url).start()
    r = kv.put("hosta.s0", record(sb, internet=True, deny=[BAD4]))
    assert a.wait("s0", r)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)
    assert open_to(sb.name, OK4)  # the control: accepted, never published
    assert closed_to(sb.name, BAD4)

    def published():
        return [json.loads(m) for m in list(got)]

    assert eventually(lambda: {e["proto"] for e in published()} >= {"tcp", "udp", "icmp"})
    assert all(e["sandbox"] == "s0" and e["dst"] == BAD4 and e["step"] == "deny_out" for e in published())
    assert all(e["entry"] == f"{BAD4}/32" for e in published())
    kept = json.loads(a.cli("denials", "s0", "--json").stdout.splitlines()[0])
    assert kept in published()  # the same event, kept and published
    assert a.agent_status()["denials"]["dropped"] == {}


def test_a_host_that_may_not_publish_its_events_keeps_its_feed(world, agent, tmp_path):
    """Credentials that may read the bucket and nothing more (docs/fleet.md): the server refuses the
    events; the session goes on (a refusal of any other publish would end it), events are counted dropped."""
    sb = world.sandboxes[0]
    agent_seed, admin_seed = tmp_path / "agent.nk", tmp_path / "admin.nk"
    agent_key, admin_key = _user_nkey(agent_seed), _user_nkey(admin_seed)
    conf = (
        f'authorization {{ users = [ {{ nkey: "{agent_key}", permissions: '
        f'{{ publish: {{ deny: ["egressd.denials.>"] }} }} }}, {{ nkey: "{admin_key}" }} ] }}\n'
    )
    options = {"nkeys_seed": str(admin_seed)}
    server = NatsServer(tmp_path / "nats", config=conf, client_options=options).start()
    try:
        with KvClient(server.url, options=options) as kv:
            a = fleet_agent(agent, server.url, extra=f'nkey = "{agent_seed}"\n').start()
            r1 = kv.put("hosta.s0", record(sb, internet=True, deny=[BAD4]))
            assert a.wait("s0", r1)
            assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)
            assert closed_to(sb.name, BAD4)
            a.wait_log("events_publish_refused", timeout=10)
            assert not ping(sb.name, BAD4)  # denied again after the refusal: not sent, counted
            assert eventually(lambda: a.agent_status()["denials"]["dropped"].get("nats", 0) >= 1)
            r2 = kv.put("hosta.s0", record(sb, internet=True, deny=[BAD4, OK4]))
            assert a.wait("s0", r2)  # the feed goes on
            assert closed_to(sb.name, OK4)
            assert feed_health(a)["disconnects"] == 0 and feed_health(a)["connected"] == 1
    finally:
        server.stop()
