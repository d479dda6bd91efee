"""The `egressd` command line: render, validate and apply policies; ask the running agent.

Exit codes: 0 success, 1 the input or an apply failed (every problem printed), 2 usage or config error or
no answer from the agent. `explain` is like grep: 0 accepted, 1 denied, 2 it could not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, TextIO

from egressd import __version__
from egressd.agent.control import ControlError, request
from egressd.agent.statusview import print_dns, print_status
from egressd.desired.dnscache import DnsCache
from egressd.desired.resolve import Resolver, resolve_once
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.hostside import HostBackend
from egressd.kernel.netns import NetnsError
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, ConfigError, load_config
from egressd.model.events import Snapshot, Upsert, parse_line
from egressd.model.sandbox import Policy, PolicyError, Sandbox, parse_sandbox
from egressd.reconcile.sync import TableSync
from egressd.ruleset.render import render
from egressd.ruleset.transactions import replace_table

MAX_INPUT_BYTES = 64 * 1024 * 1024


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read(MAX_INPUT_BYTES + 1)
    with open(path, encoding="utf-8") as f:
        return f.read(MAX_INPUT_BYTES + 1)


def _records(doc: Any) -> Iterator[tuple[str, Any]]:
    """Where each sandbox record sits in a document: a record, a bare network_policy, or a list of records."""
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            yield f"[{i}]", item
    elif isinstance(doc, dict) and "id" not in doc and "network_policy" not in doc:
        yield "", {"id": "policy", "network_policy": doc}
    else:
        yield "", doc


def _load_sandboxes(path: str, config: Config, out: TextIO) -> tuple[list[Sandbox], int]:
    """Parse a JSON document of records, or NDJSON events; print every problem; return what parsed."""
    text = _read(path)
    if len(text) > MAX_INPUT_BYTES:
        print(f"{path}: larger than {MAX_INPUT_BYTES} bytes; split it", file=out)
        return [], 1
    sandboxes: list[Sandbox] = []
    errors = 0
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # not one JSON document: newline-delimited events
        doc = None
        lines = text.splitlines()
    else:
        lines = []
    if doc is not None and not (isinstance(doc, dict) and "type" in doc):
        for where, raw in _records(doc):
            try:
                sandboxes.append(parse_sandbox(raw, config.max_entries))
            except PolicyError as e:
                errors += 1
                for p in e.problems:
                    print(f"{path}{where}: {p}", file=out)
        return sandboxes, errors
    if doc is not None:
        lines = [text]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = parse_line(line, config.max_entries)
        except PolicyError as e:
            errors += 1
            for p in e.problems:
                print(f"{path}:{n}: {p}", file=out)
            continue
        if isinstance(event, Snapshot):
            sandboxes.extend(event.sandboxes)
            for rejected in event.rejected:
                errors += 1
                for p in rejected.problems:
                    print(f"{path}:{n}: {p}", file=out)
        elif isinstance(event, Upsert):
            sandboxes.append(event.sandbox)
    return sandboxes, errors


def cmd_render(args: argparse.Namespace, config: Config) -> int:
    sandboxes, errors = _load_sandboxes(args.file, config, sys.stderr)
    if errors:
        return 1
    if len(sandboxes) != 1:
        print(
            f"{args.file}: render takes exactly one sandbox or policy; found {len(sandboxes)}",
            file=sys.stderr,
        )
        return 1
    ruleset = render(sandboxes[0].policy, config)
    json.dump(replace_table(ruleset), sys.stdout, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    return 0


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    total_errors = 0
    for path in args.files:
        try:
            sandboxes, errors = _load_sandboxes(path, config, sys.stdout)
        except (OSError, UnicodeDecodeError) as e:
            print(f"{path}: cannot read: {e}")
            total_errors += 1
            continue
        total_errors += errors
        if not errors:
            print(f"{path}: ok ({len(sandboxes)} sandbox record{'s' if len(sandboxes) != 1 else ''})")
    return 1 if total_errors else 0


def _resolve_once(config: Config, sandboxes: list[Sandbox]) -> DnsCache:
    """One resolution of every hostname the records name, the way the agent resolves them."""
    cache = DnsCache(config.dns_min_ttl, config.dns_max_ttl, config.dns_retention)
    for sb in sandboxes:
        cache.subscribe(sb.id, (*sb.policy.allow_out.hostnames, *sb.policy.deny_out.hostnames))
    if cache.names:
        asyncio.run(resolve_once(cache, Resolver(config.dns_nameservers, config.dns_timeout)))
    return cache


def _apply_one(
    sync: TableSync, backend: Backend, where: str, policy: Policy, cache: DnsCache, force: bool, host: bool
) -> tuple[str, str | None]:
    """One table through the agent's sync: (what happened, why it is held closed, if it is)."""
    ruleset, elements, waiting = sync.target(policy, cache, host=host)
    if force:
        backend.apply(where, ruleset, elements)
        return "applied", waiting
    result = sync.sync(backend, where, ruleset, elements, None)
    words = {"adopted": "unchanged", "unchanged": "unchanged", "dns_updated": "updated"}
    return words.get(result.outcome, result.outcome), waiting


def cmd_apply(args: argparse.Namespace, config: Config) -> int:
    sandboxes, errors = _load_sandboxes(args.file, config, sys.stderr)
    if errors:
        print("nothing applied: fix the problems above first", file=sys.stderr)
        return 1
    cache = _resolve_once(config, sandboxes)
    # No proxy outlives this command: its tables redirect no DNS (deny_out patterns then hold a sandbox
    # closed, as plan() says), and the agent's own tables, which do, are never taken for unchanged.
    config = replace(config, intercept=replace(config.intercept, enabled=False))
    backend = LibnftBackend()
    host = HostBackend(backend, config)
    sync = TableSync(config)
    failed = 0
    for sb in sandboxes:
        if sb.host_interface is not None:
            # The host side first, as the agent does: it is in force even if the namespace is not there.
            try:
                outcome, _ = _apply_one(
                    sync, host, sb.host_interface, sb.policy, cache, args.force, host=True
                )
            except ApplyError as e:
                print(f"{sb.id}: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"{sb.id}: host side {outcome} on {sb.host_interface}")
            if sb.netns is None:
                continue
        if sb.netns is None:
            print(f"{sb.id}: no netns in the record; nothing to apply to", file=sys.stderr)
            failed += 1
            continue
        try:
            outcome, waiting = _apply_one(sync, backend, sb.netns, sb.policy, cache, args.force, host=False)
        except (NetnsError, ApplyError) as e:
            print(f"{sb.id}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{sb.id}: {outcome} in {sb.netns}" + (f" ({waiting})" if waiting else ""))
        if outcome == "unchanged":
            continue
        for name in (*sb.policy.allow_out.hostnames, *sb.policy.deny_out.hostnames):
            view = cache.view(name)
            print(
                f"{sb.id}:   {name}: {', '.join(view['addresses']) or '-'}"
                + (f" ({view['error']})" if view["error"] else "")
            )
    backend.close()
    return 1 if failed else 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags that override the config file, as a nested dict in the file's shape."""
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in RUN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


RUN_FLAGS = {
    "feed": ("feed", "source"),
    "state_dir": ("state", "dir"),
    "control_socket": ("control", "socket"),
    "resync_interval": ("reconcile", "resync_interval"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from egressd.agent.daemon import run  # the daemon's imports are only needed here

    return run(args.config, _overrides(args))


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    req = {"cmd": "dns"} if args.dns else {"cmd": "status", "id": args.sandbox}
    answer = request(args.socket or config.control_socket, req)
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.dns:
        print_dns(answer)
    else:
        print_status(answer)
    return 0


def cmd_wait(args: argparse.Namespace, config: Config) -> int:
    req = {"cmd": "wait", "id": args.sandbox, "revision": args.revision, "timeout": args.timeout}
    answer = request(args.socket or config.control_socket, req, timeout=args.timeout + 5)
    sb = answer.get("sandbox")
    if answer.get("ok"):
        print(f"{args.sandbox}: enforced at revision {sb['revision'] if sb else '?'}")
        return 0
    where = (
        "unknown to the agent"
        if sb is None
        else f"{sb['state']} at revision {sb['revision']}: {sb['error'] or ''}"
    )
    print(f"{args.sandbox}: not enforced after {args.timeout:g} s ({where.strip()})", file=sys.stderr)
    return 1


def cmd_explain(args: argparse.Namespace, config: Config) -> int:
    """Exit 0 when every address of DEST is accepted, 1 when any is denied, 2 when there is no answer."""
    req = {"cmd": "explain", "id": args.sandbox, "dest": args.dest}
    answer = request(args.socket or config.control_socket, req, timeout=config.dns_timeout + 5)
    results = answer["results"]
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            print(f"{r['address']}: {r['text']}" if answer["hostname"] is not None else r["text"])
        if answer["state"] != "enforced":
            why = f": {answer['problem']}" if answer["problem"] else ""
            print(
                f"note: {args.sandbox} is {answer['state']}{why}; the verdict is for its desired state",
                file=sys.stderr,
            )
        for note in answer["notes"]:
            print(f"note: {note}", file=sys.stderr)
        for rdtype, why in answer.get("unresolved", {}).items():
            print(
                f"note: {answer['hostname']} {rdtype}: {why}; judged on the other type's addresses",
                file=sys.stderr,
            )
    return 0 if all(r["action"] == "accept" for r in results) else 1


def cmd_denials(args: argparse.Namespace, config: Config) -> int:
    from egressd.agent.denialview import denials

    return denials(args.socket or config.control_socket, args.sandbox, args.since, args.follow, args.json)


def _agent_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The commands that ask the running agent, over its control socket."""
    st = sub.add_parser("status", parents=[common], help="what the running agent enforces, per sandbox")
    st.add_argument("sandbox", nargs="?", help="one sandbox, with its last denials")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.add_argument("--dns", action="store_true", help="the whole DNS cache instead of the sandboxes")
    st.add_argument("--socket", metavar="PATH", help="the control socket (default: from the config)")
    st.set_defaults(func=cmd_status)

    w = sub.add_parser("wait", parents=[common], help="exit 0 once SANDBOX is enforced (at REVISION)")
    w.add_argument("sandbox")
    w.add_argument("--revision", type=int, help="at least this revision")
    w.add_argument(
        "--timeout", type=float, default=30.0, help="seconds (default 30); exit 1 when it runs out"
    )
    w.add_argument("--socket", metavar="PATH", help="the control socket (default: from the config)")
    w.set_defaults(func=cmd_wait)

    e = sub.add_parser(
        "explain",
        parents=[common],
        help="why SANDBOX can or cannot reach DEST; exit 0 accepted, 1 denied, 2 no answer",
    )
    e.add_argument("sandbox")
    e.add_argument("dest", help="an IPv4 or IPv6 address, or a host name (resolved by the agent)")
    e.add_argument("--json", action="store_true", help="machine-readable")
    e.add_argument("--socket", metavar="PATH", help="the control socket (default: from the config)")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("denials", parents=[common], help="what the sandboxes were denied, and by which rule")
    d.add_argument("sandbox", nargs="?", help="one sandbox (default: all)")
    d.add_argument("--since", type=float, metavar="SECONDS", help="only events of the last SECONDS")
    d.add_argument("--follow", action="store_true", help="then print new events as they come")
    d.add_argument("--json", action="store_true", help="one JSON object per line")
    d.add_argument("--socket", metavar="PATH", help="the control socket (default: from the config)")
    d.set_defaults(func=cmd_denials)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p = argparse.ArgumentParser(prog="egressd", description=__doc__, parents=[common])
    p.add_argument("--version", action="version", version=f"egressd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", parents=[common], help="print the nftables JSON for one policy; no kernel")
    r.add_argument("file", help="a sandbox record or a bare network_policy, JSON ('-' for stdin)")
    r.add_argument("--pretty", action="store_true", help="indent the JSON")
    r.set_defaults(func=cmd_render)

    v = sub.add_parser("validate", parents=[common], help="check records or an event file; print every error")
    v.add_argument("files", nargs="+", help="JSON record(s), or newline-delimited events")
    v.set_defaults(func=cmd_validate)

    a = sub.add_parser("apply", parents=[common], help="apply records to their namespaces once (root)")
    a.add_argument("file", help="JSON sandbox record or list of records, each with netns")
    a.add_argument("--force", action="store_true", help="rewrite even when the fingerprint is unchanged")
    a.set_defaults(func=cmd_apply)

    run = sub.add_parser(
        "run", parents=[common], help="the agent: follow the feed, keep every table in force"
    )
    run.add_argument("--feed", metavar="SOURCE", help="file:PATH, stdin or unix:PATH ([feed] source)")
    run.add_argument("--state-dir", metavar="DIR", help="where desired state is kept ([state] dir)")
    run.add_argument("--control-socket", metavar="PATH", help="the status socket ([control] socket)")
    run.add_argument("--resync-interval", type=float, metavar="S", help="seconds between full re-checks")
    run.add_argument("--log-format", choices=["json", "text"], help="json (default) or text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    _agent_parsers(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as e:
        print(f"egressd: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, config))
    except ControlError as e:
        print(f"egressd: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"egressd: {e.filename}: no such file", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
