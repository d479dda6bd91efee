"""Config: defaults, overrides, and errors that name the key."""

import ipaddress

import pytest

from egressd.model.config import ConfigError, config_from_dict, load_config
from egressd.model.config_file import parse_listen


def test_defaults_match_the_documented_guard():
    c = load_config(None)
    assert [str(n) for n in c.guard.deny] == ["169.254.0.0/16", "fd00:ec2::254/128"]
    assert c.guard.allow == ()
    assert ipaddress.ip_network("100.64.0.0/10") in c.guard.private
    assert ipaddress.ip_network("fc00::/7") in c.guard.private
    assert c.deny_action == "reject" and c.uplink == "eth0" and c.max_entries == 4096


def test_toml_file(tmp_path):
    p = tmp_path / "egressd.toml"
    p.write_text(
        '[guard]\nallow = ["10.96.0.10"]\nprivate = []\n[enforce]\ndeny_action = "drop"\n[limits]\nmax_entries = 10\n'
    )
    c = load_config(p)
    assert c.guard.allow == (ipaddress.ip_network("10.96.0.10/32"),)
    assert c.guard.private == ()
    assert c.deny_action == "drop" and c.max_entries == 10


@pytest.mark.parametrize(
    "data, says",
    [
        ({"gaurd": {}}, "unknown key 'gaurd'"),
        ({"guard": {"denny": []}}, "unknown key 'guard.denny'"),
        ({"guard": {"deny": ["10.0.0.300"]}}, "'10.0.0.300' is not an address or CIDR"),
        ({"enforce": {"deny_action": "explode"}}, "enforce.deny_action"),
        ({"enforce": {"uplink": "a" * 16}}, "enforce.uplink"),
        ({"limits": {"max_entries": 0}}, "limits.max_entries"),
    ],
)
def test_errors_name_the_key(data, says):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "egressd.toml")
    assert says in str(e.value)
    assert str(e.value).startswith("egressd.toml: ")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[guard\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    "listen, says",
    [
        ("127.0.0.1", "no port"),
        ("::1:9469", "put an IPv6 address in brackets"),
        ("[::1]9469", "must be followed by :PORT"),
        ("[nope]:9469", "is not an IPv6 address"),
        ("127.0.0.1:0", "must be a number from 1 to 65535"),
        ("127.0.0.1:http", "must be a number from 1 to 65535"),
        ("http://127.0.0.1:9469", "not a URL"),
        ("a b:9469", "is not an address or host name"),
    ],
)
def test_metrics_listen_errors(listen, says):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"metrics": {"listen": listen}}, "egressd.toml")
    assert says in str(e.value) and "metrics.listen" in str(e.value)


def test_metrics_listen_forms():
    assert load_config(None).metrics_listen == "127.0.0.1:9469"
    assert load_config(None).metrics_counters_interval == 15
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_listen("[::1]:9469") == ("::1", 9469)
    assert parse_listen("localhost:80") == ("localhost", 80)
    assert parse_listen("") is None
    assert config_from_dict({"metrics": {"listen": ""}}).metrics_listen == ""
    with pytest.raises(ConfigError, match=r"unknown key 'metrics\.port'"):
        config_from_dict({"metrics": {"port": 1}})
    with pytest.raises(ConfigError, match=r"metrics\.counters_interval"):
        config_from_dict({"metrics": {"counters_interval": 0.01}})


def test_cached_contexts_is_bounded_by_what_libnftables_can_select_on():
    assert config_from_dict({"reconcile": {"cached_contexts": 800}}).cached_contexts == 800
    for bad in (0, 801, "64"):
        with pytest.raises(ConfigError, match="cached_contexts"):
            config_from_dict({"reconcile": {"cached_contexts": bad}})


# --- [feed.nats] -------------------------------------------------------------------------------------------


def test_feed_nats_defaults(monkeypatch):
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "node-7.rack3.example.com")
    n = load_config(None).nats
    assert n.bucket == "egressd-sandboxes" and n.host_id == "node-7"
    assert (n.creds, n.nkey, n.tls_ca, n.tls_cert, n.tls_key) == ("", "", "", "", "")
    assert (n.connect_timeout, n.retry_initial, n.retry_max) == (2.0, 0.5, 30.0)


def test_default_host_id_is_the_hostname_up_to_its_first_dot(monkeypatch):
    from egressd.model.config_file import default_host_id

    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "web1.example.com")
    assert default_host_id() == "web1"
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "plain")
    assert default_host_id() == "plain"


def test_feed_nats_from_a_toml_file(tmp_path, monkeypatch):
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "ignored")
    p = tmp_path / "egressd.toml"
    p.write_text(
        '[feed]\nsource = "nats://10.0.0.1:4222"\n[feed.nats]\nbucket = "fleet_A"\nhost_id = "h-1"\n'
        'creds = "/etc/egressd/h.creds"\nretry_initial = 1\nretry_max = 1\n'
    )
    c = load_config(p)
    assert c.feed_source == "nats://10.0.0.1:4222"
    assert c.nats.bucket == "fleet_A" and c.nats.host_id == "h-1" and c.nats.creds == "/etc/egressd/h.creds"
    assert c.nats.retry_initial == c.nats.retry_max == 1


@pytest.mark.parametrize(
    "nats, says",
    [
        ({"buckett": "x"}, "unknown key 'feed.nats.buckett'"),
        ({"host_id": "a.b"}, "feed.nats.host_id"),
        ({"host_id": "a b"}, "feed.nats.host_id"),
        ({"host_id": "h" * 65}, "feed.nats.host_id"),
        ({"bucket": "x y"}, "feed.nats.bucket"),
        ({"bucket": "a.b"}, "feed.nats.bucket"),
        ({"bucket": ""}, "feed.nats.bucket"),
        ({"connect_timeout": 0}, "feed.nats.connect_timeout"),
        ({"retry_initial": 5, "retry_max": 1}, "feed.nats.retry_initial is larger than feed.nats.retry_max"),
        ({"tls_cert": "/c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "/k.pem"}, "tls_cert and tls_key go together"),
        ({"creds": "/a.creds", "nkey": "/a.nk"}, "set creds or nkey, not both"),
    ],
)
def test_feed_nats_errors_name_the_key(nats, says, monkeypatch):
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "host1")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"feed": {"nats": nats}}, "egressd.toml")
    assert says in str(e.value)
    assert str(e.value).startswith("egressd.toml: ")


def test_feed_nats_pairs_that_are_allowed(monkeypatch):
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: "host1")
    c = config_from_dict({"feed": {"nats": {"tls_cert": "/c.pem", "tls_key": "/k.pem", "nkey": "/n"}}})
    assert (c.nats.tls_cert, c.nats.tls_key, c.nats.nkey, c.nats.host_id) == (
        "/c.pem",
        "/k.pem",
        "/n",
        "host1",
    )


@pytest.mark.parametrize("hostname", ["bad_name!", "", "x" * 65])
def test_a_hostname_that_cannot_be_a_host_id_asks_to_set_it(hostname, monkeypatch):
    monkeypatch.setattr("egressd.model.config_file.socket.gethostname", lambda: hostname)
    fleet = {"feed": {"source": "nats://127.0.0.1:4222"}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(fleet)
    assert "feed.nats.host_id" in str(e.value) and "set host_id" in str(e.value)
    assert f"{hostname!r}" in str(e.value)
    # An explicit host_id is then enough.
    assert config_from_dict({"feed": {**fleet["feed"], "nats": {"host_id": "h1"}}}).nats.host_id == "h1"
    # And a host on another feed never needs one: its odd hostname must not stop it from starting.
    assert load_config(None).feed_source.startswith("unix:")
    assert config_from_dict({"feed": {"source": "file:/tmp/events"}}).feed_source == "file:/tmp/events"


@pytest.mark.parametrize(
    ("mask", "ok"),
    [(0xFFFF0000, True), (0x00FF0000, True), (0x0000FF00, True), (0xFF00FF00, False), (0xF0000000, False),
     (0xFFFFFF00, False), (0, False)],
)  # fmt: skip
def test_the_connection_mark_is_one_run_of_8_to_16_bits(mask, ok):
    if ok:
        assert config_from_dict({"dns": {"conn_mark_mask": mask}}).intercept.conn_mark_mask == mask
    else:
        with pytest.raises(ConfigError, match=r"dns\.conn_mark_mask"):
            config_from_dict({"dns": {"conn_mark_mask": mask}})
