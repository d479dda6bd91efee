"""Config: defaults, overrides, and errors that name the key."""

import ipaddress

import pytest

from egressd.config import ConfigError, config_from_dict, load_config, parse_listen


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
