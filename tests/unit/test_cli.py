"""The CLI without root: render and validate."""

import json

from egressd.cli import main
from egressd.model.config import Config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from egressd.ruleset.variants import create_commands


def test_render_prints_one_transaction(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"allow_internet_access": False, "allow_out": ["8.8.8.8"]}))
    assert main(["render", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = render(
        parse_sandbox({"id": "x", "network_policy": json.loads(f.read_text())}).policy, Config()
    )
    assert out["nftables"][:2] == [
        {"add": {"table": {"family": "inet", "name": "egressd"}}},
        {"delete": {"table": {"family": "inet", "name": "egressd"}}},
    ]
    assert out["nftables"][2:] == create_commands(expected)


def test_render_refuses_a_bad_policy(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"id": "sb-9", "network_policy": {"deny_out": ["example.com:443"]}}))
    assert main(["render", str(f)]) == 1
    assert (
        "sandbox 'sb-9': network_policy.deny_out[0] 'example.com:443': looks like host:port"
        in capsys.readouterr().err
    )


def test_validate_event_file_prints_every_error_with_line_numbers(tmp_path, capsys):
    f = tmp_path / "events.ndjson"
    f.write_text(
        "\n".join(
            [
                json.dumps(
                    {"type": "upsert", "sandbox": {"id": "ok", "network_policy": {"allow_out": ["8.8.8.8"]}}}
                ),
                "{not json",
                json.dumps(
                    {
                        "type": "upsert",
                        "sandbox": {"id": "bad", "network_policy": {"allow_out": ["999.1.1.1"]}},
                    }
                ),
                json.dumps({"type": "nope"}),
                json.dumps({"type": "delete", "id": "ok"}),
                "",
            ]
        )
    )
    assert main(["validate", str(f)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{f}:2: not valid JSON")
    assert (
        out[1]
        == f"{f}:3: sandbox 'bad': network_policy.allow_out[0] '999.1.1.1': not a valid IPv4 address: each part must be 0-255"
    )
    assert out[2].startswith(f"{f}:4: unknown event type 'nope'")
    assert len(out) == 3


def test_validate_ok(tmp_path, capsys):
    f = tmp_path / "records.json"
    f.write_text(json.dumps([{"id": "a"}, {"id": "b", "network_policy": {"deny_out": ["example.com"]}}]))
    assert main(["validate", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"{f}: ok (2 sandbox records)"


def test_bad_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[guard]\nallowed = []\n")
    f = tmp_path / "p.json"
    f.write_text("{}")
    assert main(["render", "--config", str(cfg), str(f)]) == 2
    assert "unknown key 'guard.allowed'" in capsys.readouterr().err
