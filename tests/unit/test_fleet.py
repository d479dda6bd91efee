"""The nats:// feed source without a server: server specs, TLS, what each key means, snapshots, backoff,
and what a session delivers to the daemon."""

import asyncio
import json
import random
import ssl
import subprocess
import time
from types import SimpleNamespace

import pytest
from nats.errors import SlowConsumerError
from nats.js.errors import BucketNotFoundError, NotFoundError

from egressd.common.backoff import Backoff
from egressd.feed.lines import FeedError
from egressd.feed.nats import STABLE_SESSION, NatsSource
from egressd.feed.nats_errors import SessionEnded, describe
from egressd.feed.nats_keys import KV_DEL, KV_PURGE, KvEntry, entry_change, snapshot_of
from egressd.feed.nats_servers import parse_servers, tls_context
from egressd.model.config import NatsFeed
from egressd.model.events import Delete, Snapshot, Upsert
from egressd.model.sandbox import PolicyError, parse_sandbox

HOST = "h1"


def value(**record):
    return json.dumps(record).encode()


def put(sid, rev, raw=None, host=HOST, **record):
    v = raw if raw is not None else value(netns=f"/run/netns/{sid}", **record)
    return KvEntry(f"{host}.{sid}", v, rev)


def source(**settings):
    return NatsSource("nats://127.0.0.1:4222", NatsFeed(host_id=HOST, **settings))


# --- parse_servers -----------------------------------------------------------------------------------------


def test_parse_servers_accepts_nats_and_tls_urls_separated_by_commas():
    assert parse_servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    assert parse_servers("nats://a:4222, tls://b.example:4443") == ["nats://a:4222", "tls://b.example:4443"]
    assert parse_servers("nats://[::1]:4222/") == ["nats://[::1]:4222/"]


@pytest.mark.parametrize(
    "spec, says",
    [
        ("http://a:4222", "write nats://HOST:PORT or tls://HOST:PORT"),
        ("nats://:4222", "write nats://HOST:PORT or tls://HOST:PORT"),
        ("nats://a:4222,", "not ''"),
        ("nats://a:99999", "Port out of range"),
        ("nats://a:port", "write nats://HOST:PORT"),
        ("nats://u:p@a:4222", "credentials in the URL would show in status and logs"),
        ("nats://tok@a:4222", "[feed.nats] creds or nkey"),
        ("nats://a", "no port; write nats://a:4222"),
        ("nats://a:4222/bucket", "no path, query or fragment"),
        ("nats://a:4222?x=1", "no path, query or fragment"),
        ("nats://a:4222#f", "no path, query or fragment"),
    ],
)
def test_parse_servers_errors_say_what_to_write(spec, says):
    with pytest.raises(FeedError) as e:
        parse_servers(spec)
    assert says in str(e.value)
    shown = spec if "@" not in spec else spec.split("//", 1)[0] + "//***@" + spec.split("@", 1)[1]
    assert str(e.value).startswith(f"event source {shown!r}: ")


def test_credentials_in_the_url_are_not_echoed():
    with pytest.raises(FeedError) as e:
        parse_servers("nats://alice:s3cret@a:4222")
    assert "credentials in the URL" in str(e.value)
    assert "s3cret" not in str(e.value)


# --- tls_context -------------------------------------------------------------------------------------------


OPENSSL_REQ = (
    *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
    *("-nodes", "-days", "1", "-subj", "/CN=x"),
)


def make_pair(tmp_path, name="c"):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(
        [*OPENSSL_REQ, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def test_no_tls_without_tls_urls_or_settings():
    assert tls_context(NatsFeed(host_id=HOST), ["nats://a:4222"]) is None


def test_a_tls_url_turns_tls_on_with_the_system_cas():
    ctx = tls_context(NatsFeed(host_id=HOST), ["nats://a:4222", "tls://b:4222"])
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    # Python 3.13's strict defaults on every release (docs/fleet.md, TLS certificates)
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT and ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN


def verification_error(message: str) -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    e.verify_message = message
    return e


def test_describe_says_what_a_strictly_verified_ca_needs():
    text = describe(verification_error("CA cert does not include key usage extension"), "b")
    assert text.startswith("the server's TLS certificate is not trusted (CA cert does not include key usage")
    assert "keyUsage critical keyCertSign, cRLSign" in text and "docs/fleet.md" in text
    assert "authorityKeyIdentifier" in describe(verification_error("Missing Authority Key Identifier"), "b")
    # an untrusted CA is not a strictness problem: no hint that would send the operator the wrong way
    other = describe(verification_error("unable to get local issuer certificate"), "b")
    assert other.endswith("check [feed.nats] tls_ca") and "strictly" not in other


def test_a_missing_ca_file_names_tls_ca(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(FeedError) as e:
        tls_context(NatsFeed(host_id=HOST, tls_ca=missing), ["nats://a:4222"])
    assert str(e.value).startswith(f"[feed.nats] tls_ca {missing!r}: ") and "PEM CA bundle" in str(e.value)


def test_a_ca_file_that_is_not_pem_names_tls_ca(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(FeedError, match=r"^\[feed\.nats\] tls_ca "):
        tls_context(NatsFeed(host_id=HOST, tls_ca=str(junk)), ["nats://a:4222"])


def test_a_missing_client_certificate_names_tls_cert_and_tls_key(tmp_path):
    with pytest.raises(FeedError) as e:
        tls_context(
            NatsFeed(host_id=HOST, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem")),
            ["nats://a:4222"],
        )
    assert str(e.value).startswith("[feed.nats] tls_cert ") and "tls_key" in str(e.value)
    assert "give a PEM certificate and its key" in str(e.value)


def test_a_valid_ca_and_client_pair_load(tmp_path):
    cert, key = make_pair(tmp_path)
    ctx = tls_context(NatsFeed(host_id=HOST, tls_ca=cert, tls_cert=cert, tls_key=key), ["nats://a:4222"])
    assert isinstance(ctx, ssl.SSLContext)
    assert any(c.get("subject") == ((("commonName", "x"),),) for c in ctx.get_ca_certs())


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path):
    cert, _ = make_pair(tmp_path, "one")
    _, other_key = make_pair(tmp_path, "two")
    with pytest.raises(FeedError, match=r"^\[feed\.nats\] tls_cert "):
        tls_context(NatsFeed(host_id=HOST, tls_cert=cert, tls_key=other_key), ["nats://a:4222"])


# --- entry_change ------------------------------------------------------------------------------------------


def test_a_put_is_an_upsert_with_the_kv_revision_and_the_keys_id():
    change = entry_change(put("a", 17, revision=3, network_policy={"deny_out": ["1.1.1.1"]}), HOST)
    assert isinstance(change, Upsert)
    sb = change.sandbox
    assert sb.id == "a" and sb.revision == 17 and sb.netns == "/run/netns/a"
    want = parse_sandbox({"id": "a", "netns": "/run/netns/a", "network_policy": {"deny_out": ["1.1.1.1"]}})
    assert sb.policy == want.policy and sb.policy != parse_sandbox({"id": "a"}).policy


def test_a_record_may_repeat_its_own_id():
    change = entry_change(put("a", 2, id="a"), HOST)
    assert isinstance(change, Upsert) and change.sandbox.id == "a" and change.sandbox.revision == 2


def test_a_value_with_a_bad_revision_still_takes_the_kv_revision():
    change = entry_change(put("a", 9, revision="seven"), HOST)
    assert isinstance(change, Upsert) and change.sandbox.revision == 9


@pytest.mark.parametrize("op", [KV_DEL, KV_PURGE])
def test_delete_and_purge_are_deletes(op):
    assert entry_change(KvEntry(f"{HOST}.a", b"", 5, op), HOST) == Delete("a")
    assert entry_change(KvEntry(f"{HOST}.a", None, 5, op), HOST) == Delete("a")


def refused(entry, says, **kw):
    change = entry_change(entry, HOST, **kw)
    assert isinstance(change, PolicyError), change
    assert change.sandbox_id == entry.key.split(".", 1)[1]
    assert change.revision == entry.revision
    text = "; ".join(change.problems)
    assert says in text, text
    return change


@pytest.mark.parametrize("raw", [b"", b"  \n", None])
def test_an_empty_value_is_refused(raw):
    e = refused(KvEntry(f"{HOST}.a", raw, 4), "the value is empty; to remove a sandbox, delete its key")
    assert e.problems[0].startswith("sandbox 'a': ")


def test_an_oversize_value_is_refused_and_one_at_the_limit_is_not():
    raw = value(netns="/run/netns/a")
    refused(KvEntry(f"{HOST}.a", raw, 4), f"the value is {len(raw)} bytes", max_value=len(raw) - 1)
    refused(KvEntry(f"{HOST}.a", raw, 4), f"max_line_bytes ({len(raw) - 1})", max_value=len(raw) - 1)
    assert isinstance(entry_change(KvEntry(f"{HOST}.a", raw, 4), HOST, max_value=len(raw)), Upsert)


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"{not json", "the value is not a JSON record: Expecting property name"),
        (b'{"a": 1', "the value is not a JSON record: "),
        (b"\xff\xfe\xfa", "the value is not a JSON record: "),
        (b"[" * 200_000, "the value is not a JSON record: "),
    ],
)
def test_a_value_that_is_not_json_is_refused(raw, says):
    refused(KvEntry(f"{HOST}.a", raw, 6), says)


@pytest.mark.parametrize(
    "raw, kind", [(b"[1]", "list"), (b'"x"', "str"), (b"3", "int"), (b"null", "NoneType")]
)
def test_a_value_that_is_not_an_object_is_refused(raw, kind):
    refused(KvEntry(f"{HOST}.a", raw, 6), f"must be a JSON object (a sandbox record), not {kind}")


@pytest.mark.parametrize("other", ["b", 5, None])
def test_an_id_that_is_not_the_keys_is_refused(other):
    e = refused(put("a", 8, id=other), f"the record's id {str(other)!r} is not the key's")
    assert f"under key {HOST}.<its id>, or leave id out" in e.problems[0]


def test_an_invalid_policy_entry_is_refused_naming_the_field_and_entry():
    e = refused(
        put("a", 11, network_policy={"deny_out": ["1.1.1.1", "300.0.0.1"]}), "network_policy.deny_out[1]"
    )
    assert "'300.0.0.1'" in e.problems[0] and e.netns == "/run/netns/a"


def test_too_many_entries_is_refused():
    refused(put("a", 3, network_policy={"deny_out": ["1.1.1.1", "2.2.2.2", "3.3.3.3"]}), "", max_entries=2)


@pytest.mark.parametrize("sid", ["", "-x", "a b", "x" * 129])
def test_a_key_that_cannot_name_a_sandbox_is_an_unnamed_error(sid):
    change = entry_change(put(sid, 3), HOST)
    assert isinstance(change, PolicyError) and change.sandbox_id is None
    assert change.problems and all(p.startswith(f"key '{HOST}.{sid}': ") for p in change.problems)


def test_a_dotted_sandbox_id_is_taken_from_the_whole_rest_of_the_key():
    change = entry_change(put("a.b", 3), HOST)
    assert isinstance(change, Upsert) and change.sandbox.id == "a.b"


# --- snapshot_of -------------------------------------------------------------------------------------------


def test_snapshot_of_keeps_the_latest_value_per_key_and_forgets_deleted_keys():
    entries = [
        put("a", 1, network_policy={"deny_out": ["1.1.1.1"]}),
        put("b", 2),
        put("a", 3, network_policy={"deny_out": ["2.2.2.2"]}),
        KvEntry(f"{HOST}.b", None, 4, KV_DEL),
        put("c", 5),
        KvEntry(f"{HOST}.d", None, 6, KV_PURGE),
    ]
    snap, unnamed = snapshot_of(entries, HOST)
    assert isinstance(snap, Snapshot) and snap.authoritative is True
    assert [(s.id, s.revision) for s in snap.sandboxes] == [("a", 3), ("c", 5)]
    assert "2.2.2.2" in repr(snap.sandboxes[0].policy) and "1.1.1.1" not in repr(snap.sandboxes[0].policy)
    assert snap.rejected == () and unnamed == []


def test_a_bad_latest_value_is_rejected_even_after_a_good_one():
    snap, _ = snapshot_of([put("a", 1), put("a", 2, raw=b"{")], HOST)
    assert snap.sandboxes == ()
    (err,) = snap.rejected
    assert err.sandbox_id == "a" and err.revision == 2


def test_a_deleted_then_written_again_key_is_listed():
    snap, _ = snapshot_of([put("a", 1), KvEntry(f"{HOST}.a", None, 2, KV_DEL), put("a", 3)], HOST)
    assert [(s.id, s.revision) for s in snap.sandboxes] == [("a", 3)]


def test_snapshot_of_rejections_carry_the_key_and_revision():
    entries = [
        put("a", 7, raw=b"[]"),
        put("b", 8, network_policy={"allow_out": ["300.1.1.1"]}),
        put("ok", 9),
    ]
    snap, unnamed = snapshot_of(entries, HOST)
    assert [s.id for s in snap.sandboxes] == ["ok"] and unnamed == []
    a, b = snap.rejected
    assert a.sandbox_id == "a" and a.revision == 7
    assert a.problems == [
        f"key {HOST}.a (revision 7): sandbox 'a': the value must be a JSON object (a sandbox record), not list"
    ]
    assert b.sandbox_id == "b" and b.revision == 8 and b.netns == "/run/netns/b"
    assert all(p.startswith(f"key {HOST}.b (revision 8): ") for p in b.problems)
    assert "300.1.1.1" in b.problems[0]


def test_keys_that_name_no_sandbox_are_returned_separately():
    bad = put("-x", 4)
    snap, unnamed = snapshot_of([put("a", 1), bad], HOST)
    assert [s.id for s in snap.sandboxes] == ["a"]
    assert snap.rejected == ()  # an unnamed one must not make the snapshot partial
    ((entry, err),) = unnamed
    assert entry == bad and err.sandbox_id is None and f"{HOST}.-x" in err.problems[0]


def test_an_empty_bucket_is_an_empty_authoritative_snapshot():
    snap, unnamed = snapshot_of([], HOST)
    assert snap == Snapshot((), (), authoritative=True) and unnamed == []


# --- Backoff -----------------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half():
    b = Backoff(0.5, 4.0, random.Random(7))
    twin = random.Random(7)
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for step in steps:
        d = b.next()
        assert step * 0.5 <= d <= step
        assert d == pytest.approx(step * twin.uniform(0.5, 1.0))
    assert b.failures == len(steps)


def test_backoff_jitter_covers_the_upper_half_and_is_seeded():
    draws = [Backoff(1.0, 1.0, random.Random(s)).next() for s in range(200)]
    assert all(0.5 <= d <= 1.0 for d in draws)
    assert min(draws) < 0.6 and max(draws) > 0.9  # jittered, not a constant
    assert Backoff(1.0, 8.0, random.Random(3)).next() == Backoff(1.0, 8.0, random.Random(3)).next()


def test_backoff_reset_starts_again_from_the_initial_delay():
    b = Backoff(1.0, 60.0, random.Random(1))
    for _ in range(5):
        b.next()
    assert b.next() > 8.0  # step 32
    b.reset()
    assert b.failures == 0 and b.next() <= 1.0


def test_backoff_after_very_many_failures_stays_at_the_cap():
    b = Backoff(0.5, 30.0, random.Random(2))
    for _ in range(2000):
        d = b.next()
    assert 15.0 <= d <= 30.0


# --- NatsSource: construction, health, errors --------------------------------------------------------------


def test_a_fresh_source_is_disconnected_and_empty():
    s = source()
    h = s.health()
    assert h["connected"] == 0 and h["bucket"] == "egressd-sandboxes" and h["host_id"] == HOST
    assert (h["keys"], h["snapshots"], h["disconnects"], h["revision"], h["values_rejected"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert h["server"] is None and h["retry_at"] is None and h["connected_since"] is None
    assert s.prefix == f"{HOST}." and not s.caught_up and not s.live
    assert s._tls is None


def test_construction_checks_the_spec_and_tls():
    with pytest.raises(FeedError, match="no port"):
        NatsSource("nats://a", NatsFeed(host_id=HOST))
    assert isinstance(NatsSource("tls://a:4222", NatsFeed(host_id=HOST))._tls, ssl.SSLContext)
    with pytest.raises(FeedError, match=r"tls_ca"):
        source(tls_ca="/nonexistent/ca.pem")


@pytest.mark.parametrize("key", ["creds", "nkey"])
def test_credential_files_must_be_readable(tmp_path, key):
    missing = str(tmp_path / "missing")
    with pytest.raises(FeedError) as e:
        source(**{key: missing})
    assert str(e.value).startswith(f"[feed.nats] {key} {missing!r}: cannot read it: ")
    assert "No such file" in str(e.value)
    readable = tmp_path / "ok"
    readable.write_text("SUAxxx\n")
    assert source(**{key: str(readable)}).settings == NatsFeed(host_id=HOST, **{key: str(readable)})


def test_a_directory_is_not_a_credentials_file(tmp_path):
    with pytest.raises(FeedError, match=r"^\[feed\.nats\] nkey .*cannot read it"):
        source(nkey=str(tmp_path))


def test_describe_a_missing_bucket_says_how_to_make_it():
    text = describe(BucketNotFoundError(), "my-bucket")
    assert "bucket 'my-bucket' does not exist" in text and "nats kv add my-bucket" in text


def test_describe_network_failures_and_others():
    assert describe(ConnectionRefusedError(111, "Connection refused"), "b").startswith(
        "cannot reach the server: "
    )
    assert "Connection refused" in describe(ConnectionRefusedError(111, "Connection refused"), "b")
    assert describe(OSError(), "b") == "cannot reach the server: OSError"
    assert describe(TimeoutError(), "b") == "cannot reach the server: TimeoutError"
    assert "[feed.nats] creds or nkey" in describe(Exception("Authorization Violation"), "b")
    assert describe(ValueError("boom"), "b") == "ValueError: boom"


# --- NatsSource: what a session delivers --------------------------------------------------------------------


def item(key, raw, rev, op=None):
    return SimpleNamespace(key=key, value=raw, revision=rev, operation=op)


def test_a_snapshot_delivers_one_snapshot_line_and_one_line_per_unnamed_key():
    s = source()
    lines = []
    raw = [
        item(f"{HOST}.a", value(netns="/run/netns/a"), 1),
        item(f"{HOST}.b", b"[]", 2),
        item(f"{HOST}.-x", value(), 3),
        item(f"{HOST}.c", value(netns="/run/netns/c"), 4),
    ]
    entries = [s._entry(i) for i in raw]
    assert s.revision == 4 and not s.caught_up
    s._apply_snapshot(entries, lines.append, 0.001)
    snaps = [ln for ln in lines if isinstance(ln.event, Snapshot)]
    assert len(snaps) == 1 and len(lines) == 2
    (snap_line,) = snaps
    assert snap_line.source == "nats://127.0.0.1:4222" and snap_line.lineno == 4 and snap_line.text is None
    assert snap_line.event.authoritative
    assert [sb.id for sb in snap_line.event.sandboxes] == ["a", "c"]
    assert [e.sandbox_id for e in snap_line.event.rejected] == ["b"]
    (unnamed,) = [ln for ln in lines if isinstance(ln.event, PolicyError)]
    assert unnamed.key == f"{HOST}.-x" and unnamed.lineno == 3 and unnamed.event.sandbox_id is None
    assert s.keys == {f"{HOST}.a", f"{HOST}.b", f"{HOST}.-x", f"{HOST}.c"}
    assert s.values_rejected == 2 and s.snapshots == 1 and s.live and s.caught_up
    h = s.health()
    assert h["connected"] == 1 and h["keys"] == 4 and h["revision"] == 4 and h["values_rejected"] == 2
    assert h["connected_since"] is not None and h["lines"] == 2
    assert f"{HOST}.-x" in h["last_error"]  # a key that names no sandbox is shown, not cleared by connecting


def test_only_a_session_that_held_resets_the_backoff():
    """A server that drops every session right after its snapshot is retried ever more slowly; one that
    held a session for STABLE_SESSION is retried at once."""
    seen: list[int] = []
    errors: list[str | None] = []

    async def session(on_line):
        seen.append(s._backoff.failures)
        errors.append(s.health()["last_error"])
        if len(seen) == 1:
            raise OSError("connection refused")
        if len(seen) == 4:
            raise asyncio.CancelledError
        s._apply_snapshot([], on_line, 0.0)
        if len(seen) == 3:
            s.connected_since = time.time() - STABLE_SESSION - 1

    feed = NatsFeed(host_id=HOST, retry_initial=0.001, retry_max=0.004)
    s = NatsSource("nats://127.0.0.1:4222", feed, session=session)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(s.run([].append))
    assert seen == [0, 1, 2, 1]
    assert s.disconnects == 2 and s.snapshots == 2 and s.caught_up and not s.live
    assert errors[1].startswith("cannot reach the server: connection refused; enforcing the last known state")
    assert errors[2] is None or errors[2].startswith("the connection was closed")


def test_a_key_deleted_within_the_snapshot_is_not_counted():
    s = source()
    entries = [put("a", 1), KvEntry(f"{HOST}.a", None, 2, KV_DEL), put("b", 3)]
    lines = []
    s._apply_snapshot(entries, lines.append, 0.0)
    assert [sb.id for sb in lines[0].event.sandboxes] == ["b"]  # the snapshot forgets a
    assert s.keys == {f"{HOST}.b"}  # but health still counts it


def test_changes_deliver_one_line_each_with_key_and_revision():
    s = source()
    lines = []
    s._apply_snapshot([], lines.append, 0.0)
    lines.clear()
    s._apply_change(s._entry(item(f"{HOST}.a", value(netns="/run/netns/a", revision=1), 10)), lines.append)
    s._apply_change(s._entry(item(f"{HOST}.b", b"{", 11)), lines.append)
    s._apply_change(s._entry(item(f"{HOST}.a", None, 12, KV_DEL)), lines.append)
    s._apply_change(s._entry(item(f"{HOST}.-x", value(), 13)), lines.append)
    assert [(ln.key, ln.lineno) for ln in lines] == [
        (f"{HOST}.a", 10),
        (f"{HOST}.b", 11),
        (f"{HOST}.a", 12),
        (f"{HOST}.-x", 13),
    ]
    up, bad, gone, unnamed = (ln.event for ln in lines)
    assert isinstance(up, Upsert) and up.sandbox.id == "a" and up.sandbox.revision == 10
    assert isinstance(bad, PolicyError) and bad.sandbox_id == "b" and bad.revision == 11
    assert gone == Delete("a")
    assert isinstance(unnamed, PolicyError) and unnamed.sandbox_id is None
    assert s.keys == {f"{HOST}.b", f"{HOST}.-x"}
    assert s.revision == 13 and s.values_rejected == 2
    h = s.health()
    assert h["keys"] == 2 and h["revision"] == 13 and h["values_rejected"] == 2
    assert h["last_error"].startswith(f"key {HOST}.-x (revision 13): ")


def test_the_revision_never_goes_back():
    s = source()
    s._entry(item(f"{HOST}.a", b"{}", 9))
    s._entry(item(f"{HOST}.a", b"{}", 4))
    s._entry(item(f"{HOST}.a", b"{}", None))
    assert s.revision == 9


def test_a_source_with_another_max_value_refuses_bigger_values():
    s = NatsSource("nats://127.0.0.1:4222", NatsFeed(host_id=HOST), max_value=10)
    lines = []
    s._apply_change(put("a", 2), lines.append)
    (ln,) = lines
    assert (
        isinstance(ln.event, PolicyError) and "more than [feed] max_line_bytes (10)" in ln.event.problems[0]
    )


def test_an_id_mismatch_is_closed_in_the_namespace_its_record_names():
    change = entry_change(put("a", 7, id="b", host_interface="veth-a"), HOST)
    assert isinstance(change, PolicyError) and change.sandbox_id == "a" and change.revision == 7
    assert change.netns == "/run/netns/a" and change.host_interface == "veth-a"
    assert "the record's id 'b' is not the key's" in change.problems[0]


class FakeWatcher:
    """What _follow uses of nats-py's KeyWatcher: updates(timeout) for the snapshot, iteration after it."""

    def __init__(self, items, stall_after=None):
        self.items = list(items)
        self.stall_after = stall_after

    async def updates(self, timeout=5.0):
        if not self.items or (self.stall_after is not None and self.stall_after <= 0):
            await asyncio.sleep(timeout)
            raise TimeoutError
        if self.stall_after is not None:
            self.stall_after -= 1
        return self.items.pop(0)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)


def test_a_snapshot_that_stops_coming_ends_the_session_and_forgets_nothing(monkeypatch):
    monkeypatch.setattr("egressd.feed.nats.SNAPSHOT_IDLE", 0.05)
    s = source()
    lines = []
    raw = [item(f"{HOST}.a", value(netns="/run/netns/a"), 1), item(f"{HOST}.b", value(), 2), None]
    with pytest.raises(SessionEnded, match="stopped coming after 1 keys"):
        asyncio.run(s._follow(FakeWatcher(raw, stall_after=1), lines.append))
    assert lines == [] and not s.live and s.snapshots == 0  # no partial snapshot reached the daemon


def test_a_watch_that_ends_before_its_marker_ends_the_session(monkeypatch):
    s = source()
    lines = []
    sentinel = object()  # nats-py's STOP_ITER has no key
    raw = [item(f"{HOST}.a", value(netns="/run/netns/a"), 1), sentinel]
    with pytest.raises(SessionEnded, match="before its current values were all read"):
        asyncio.run(s._follow(FakeWatcher(raw), lines.append))
    assert lines == []


def test_after_the_marker_changes_follow_until_the_watch_ends():
    s = source()
    lines = []
    raw = [item(f"{HOST}.a", value(netns="/run/netns/a"), 1), None, item(f"{HOST}.a", None, 2, KV_DEL)]
    with pytest.raises(SessionEnded, match="watch was stopped"):
        asyncio.run(s._follow(FakeWatcher(raw), lines.append))
    assert [type(ln.event).__name__ for ln in lines] == ["Snapshot", "Delete"]
    assert s.revision == 2 and s.keys == set()


class FakeJs:
    def __init__(self, infos):
        self.infos = list(infos)

    async def stream_info(self, stream):
        info = self.infos.pop(0)
        if isinstance(info, Exception):
            raise info
        return info


def _info(created, last_seq):
    return SimpleNamespace(created=created, state=SimpleNamespace(last_seq=last_seq))


@pytest.mark.parametrize(
    ("later", "says"),
    [
        (_info("t1", 100), "was made anew"),  # created again: caught even with more revisions than before
        (_info("t0", 3), "was made anew"),  # revisions went back
        (NotFoundError(), "was deleted"),
    ],
)
def test_the_bucket_check_ends_a_session_on_another_bucket(monkeypatch, later, says):
    monkeypatch.setattr("egressd.feed.nats.BUCKET_CHECK_INTERVAL", 0.001)
    s = source()
    s.revision = 10
    js = FakeJs([_info("t0", 10), TimeoutError(), _info("t0", 12), later])  # same, busy, grown: all fine
    with pytest.raises(SessionEnded, match=says):
        asyncio.run(s._check_bucket(js, "KV_egressd-sandboxes", "t0"))
    assert js.infos == []


def test_a_client_error_once_the_watch_is_on_ends_the_session(monkeypatch):
    """A message nats-py dropped as a slow consumer (or a consumer it could not make again) may be a lost
    change: the session starts over with a snapshot instead of following with a gap."""
    captured = {}

    async def fake_connect(**kw):
        captured.update(kw)
        return SimpleNamespace()

    monkeypatch.setattr("nats.connect", fake_connect)
    s = source()
    lost = asyncio.Event()

    async def scenario():
        await s._connect(lost)
        await captured["error_cb"](OSError("before the watch"))
        assert not lost.is_set() and isinstance(s._cause, OSError)
        s._watching = True
        await captured["error_cb"](SlowConsumerError("_INBOX.x", "", 1, None))
        assert lost.is_set() and isinstance(s._cause, SlowConsumerError)

    asyncio.run(scenario())
    assert captured["allow_reconnect"] is False and captured["max_reconnect_attempts"] == 1
    assert "slow consumer" in describe(SlowConsumerError("_INBOX.x", "", 1, None), "b")
