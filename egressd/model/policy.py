"""The edge: sandbox records and events from the platform, validated into plain dataclasses.

Everything that arrives from outside passes through here. A bad input becomes a `PolicyError` that names the
sandbox, the field and the entry, and says what to write instead; nothing past this module sees raw input.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import idna
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_ENTRIES = 4096
SANDBOX_STATUSES = ("pending", "running", "snapshotting", "suspending", "suspended", "terminated")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NETNS_RE = re.compile(r"^(/run/netns/[A-Za-z0-9][A-Za-z0-9._-]{0,254}|/proc/[1-9][0-9]{0,9}/ns/net)$")
# An interface name the kernel accepts (IFNAMSIZ 16, so 1-15 bytes), limited to the characters veth and tap
# names use in practice: no wildcard, quote or separator can reach nftables.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,14}$")
# Dotted quads without leading zeros, or IPv6 in hex and colons only; an optional prefix of 1-3 digits.
_FAST_NET_RE = re.compile(
    r"^((?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    r"|[0-9A-Fa-f:]{2,39})(?:/([0-9]{1,3}))?$"
)
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class PolicyError(ValueError):
    """One or more problems with one input; `problems` lists each as a full sentence.

    When the record's id (and netns, revision) could still be read, they are kept so that the agent can
    close that sandbox (deny-all) or keep its last good policy, instead of losing track of it.
    """

    def __init__(
        self,
        problems: Sequence[str],
        sandbox_id: str | None = None,
        netns: str | None = None,
        revision: int | None = None,
        host_interface: str | None = None,
    ) -> None:
        self.problems = list(problems)
        self.sandbox_id = sandbox_id
        self.netns = netns
        self.revision = revision
        self.host_interface = host_interface
        super().__init__("; ".join(self.problems))


def collapse(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Merge overlapping and adjacent networks, sorted, IPv4 first; fast when little merges.

    ipaddress.collapse_addresses costs ~60 ms for 10,000 entries; this merges integer intervals per family
    and only summarises a range where networks really merged.
    """
    out: list[IPNetwork] = []
    by_family: dict[int, list[IPNetwork]] = {4: [], 6: []}
    for n in nets:
        by_family[n.version].append(n)
    for members in by_family.values():
        spans = sorted(
            ((int(n.network_address), int(n.broadcast_address), n) for n in members),
            key=lambda s: (s[0], -s[1]),
        )
        i = 0
        while i < len(spans):
            _, end, net = spans[i]
            j = i + 1
            merged = False
            while j < len(spans) and spans[j][0] <= end + 1:
                merged = merged or spans[j][1] > end
                end = max(end, spans[j][1])
                j += 1
            if merged:
                last = type(net.network_address)(end)
                out.extend(ipaddress.summarize_address_range(net.network_address, last))  # type: ignore[arg-type]
            else:
                out.append(net)
            i = j
    return tuple(out)


# --- plain dataclasses used inside the agent -------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The destinations of one list (allow_out or deny_out), split by kind and family."""

    nets4: tuple[ipaddress.IPv4Network, ...] = ()
    nets6: tuple[ipaddress.IPv6Network, ...] = ()
    hostnames: tuple[str, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[IPNetwork | str]) -> Targets:
        nets4: list[ipaddress.IPv4Network] = []
        nets6: list[ipaddress.IPv6Network] = []
        hosts: list[str] = []
        for e in entries:
            if isinstance(e, ipaddress.IPv4Network):
                nets4.append(e)
            elif isinstance(e, ipaddress.IPv6Network):
                nets6.append(e)
            else:
                hosts.append(e)
        return cls(
            nets4=collapse(nets4),  # type: ignore[arg-type]
            nets6=collapse(nets6),  # type: ignore[arg-type]
            hostnames=tuple(sorted(set(hosts))),
        )


@dataclass(frozen=True)
class Policy:
    """A validated network_policy."""

    allow_internet_access: bool = True
    allow_out: Targets = field(default_factory=Targets)
    deny_out: Targets = field(default_factory=Targets)


DENY_ALL = Policy(allow_internet_access=False)


@dataclass(frozen=True)
class Sandbox:
    """A validated sandbox record: who it is, where its namespace is, and what it may reach."""

    id: str
    netns: str | None
    policy: Policy
    status: str = "running"
    revision: int | None = None
    host_interface: str | None = None  # its link's host end, where the host-side table judges it again


# --- entries ---------------------------------------------------------------------------------------------


def _normalise_mapped(net: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 entry means the IPv4 destination: the kernel sends such traffic as IPv4."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


def _fast_network(text: str) -> IPNetwork | None:
    """The common, well-formed entry parsed with inet_pton and integers: 5-15x faster than ipaddress parsing
    the text, which was most of validating a record (and a restart validates every record). Only shapes on
    which inet_pton and ipaddress agree take this path; None sends everything else to the careful parser."""
    m = _FAST_NET_RE.match(text)
    if m is None:
        return None
    addr_part, prefix_part = m.group(1), m.group(2)
    v6 = ":" in addr_part
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr_part)
    except OSError:
        return None
    bits = 128 if v6 else 32
    length = bits if prefix_part is None else int(prefix_part)
    if length > bits:
        return None
    value = int.from_bytes(packed, "big")
    if v6:
        if length >= 96 and value >> 32 == 0xFFFF:  # IPv4-mapped: see _normalise_mapped
            return None
        return ipaddress.IPv6Network((value, length), strict=False)
    return ipaddress.IPv4Network((value, length), strict=False)


def _parse_network(text: str) -> IPNetwork:
    """Parse an address or CIDR; raises ValueError with a message written for the operator."""
    fast = _fast_network(text)
    if fast is not None:
        return fast
    addr_part, _, prefix_part = text.partition("/")
    if "%" in addr_part:
        raise ValueError("scoped IPv6 addresses (with %zone) are not supported; give the address alone")
    try:
        addr = ipaddress.ip_address(addr_part)
    except ValueError:
        if ":" in addr_part:
            raise ValueError("not a valid IPv6 address; write it like 2001:db8::1 or 2001:db8::/32") from None
        if addr_part.count(".") == 3 and all(p.isdigit() for p in addr_part.split(".")):
            if any(len(p) > 1 and p.startswith("0") for p in addr_part.split(".")):
                raise ValueError("leading zeros in an IPv4 address are ambiguous; write 10.1.2.3") from None
            raise ValueError("not a valid IPv4 address: each part must be 0-255") from None
        raise ValueError(
            "not a valid IPv4 address (an all-numeric name is not a hostname); write it like 198.51.100.7"
        ) from None
    if not prefix_part:
        return _normalise_mapped(ipaddress.ip_network(addr))
    if not prefix_part.isdigit() or len(prefix_part) > 3:
        raise ValueError("the prefix length after '/' must be a number, e.g. 198.51.100.0/24")
    length = int(prefix_part)
    if length > addr.max_prefixlen:
        raise ValueError(
            f"prefix length {length} is too long for IPv{addr.version} (at most {addr.max_prefixlen})"
        )
    return _normalise_mapped(ipaddress.ip_network((addr, length), strict=False))


def normalise_hostname(text: str) -> str:
    """RFC 1123 host name, lower case, no trailing dot; internationalised names become their A-label form."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("empty host name")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a valid internationalised host name ({e})") from None
    name = name.lower()
    if len(name) > 253:
        raise ValueError(f"host name is {len(name)} characters long; the limit is 253")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError("host name has an empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"label {label[:20]!r}... is {len(label)} characters long; the limit is 63")
        if not _LABEL_RE.match(label):
            raise ValueError(
                f"label {label!r} may hold only letters, digits and inner hyphens (RFC 1123 host name)"
            )
    if labels[-1].isdigit():
        raise ValueError(
            "an all-numeric top-level label is not a host name; is this a mistyped IPv4 address?"
        )
    return name


def parse_entry(value: Any) -> IPNetwork | str:
    """One allow_out/deny_out entry: an address or CIDR (as a network) or a host name (as a string)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string (an address, CIDR or host name), not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("empty entry; remove it or give an address, CIDR or host name")
    if "://" in text:
        raise ValueError("looks like a URL; give only the host name or address, e.g. example.com")
    if "*" in text:
        raise ValueError(
            "wildcard host names are not supported: egressd resolves each name itself, and a wildcard "
            "names no address to resolve; list each host name, e.g. api.example.com"
        )
    if text.startswith("[") or (text.count(":") == 1 and "/" not in text):
        raise ValueError("looks like host:port; ports are not supported, give only the host name or address")
    if any(c.isspace() for c in text):
        raise ValueError("contains whitespace; give one address, CIDR or host name per entry")
    if "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text):
        return _parse_network(text)
    return normalise_hostname(text)


# --- pydantic models at the edge ---------------------------------------------------------------------------


class _NetworkPolicyModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    allow_internet_access: StrictBool = True
    allow_out: list[Any] = Field(default_factory=list)
    deny_out: list[Any] = Field(default_factory=list)


class _SandboxModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    status: Literal["pending", "running", "snapshotting", "suspending", "suspended", "terminated"] = "running"
    network_policy: _NetworkPolicyModel | None = None
    netns: str | None = None
    revision: int | None = Field(default=None, ge=0, le=2**63 - 1)
    host_interface: str | None = None


def _pydantic_problems(prefix: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "record"
        out.append(f"{prefix}{loc}: {e['msg']}")
    return out


def _parse_list(
    sid: str, name: str, items: list[Any], max_entries: int, problems: list[str]
) -> list[IPNetwork | str]:
    where = f"sandbox {sid!r}: network_policy.{name}"
    if len(items) > max_entries:
        problems.append(
            f"{where} has {len(items)} entries; the limit is {max_entries} "
            "(raise [limits] max_entries, or use CIDRs)"
        )
        return []
    parsed: list[IPNetwork | str] = []
    for i, item in enumerate(items):
        try:
            parsed.append(parse_entry(item))
        except ValueError as e:
            shown = repr(item) if not isinstance(item, str) else repr(item[:200])
            problems.append(f"{where}[{i}] {shown}: {e}")
    return parsed


def parse_sandbox(raw: Any, max_entries: int = DEFAULT_MAX_ENTRIES) -> Sandbox:
    """Validate one sandbox record; raises PolicyError listing every problem found."""
    if not isinstance(raw, dict):
        raise PolicyError([f"a sandbox record must be a JSON object, not {type(raw).__name__}"])
    rid, rns, rrev = raw.get("id"), raw.get("netns"), raw.get("revision")
    rif = raw.get("host_interface")
    sid = rid if isinstance(rid, str) and _ID_RE.match(rid) else "?"
    ident = {
        "sandbox_id": None if sid == "?" else sid,
        "netns": rns if isinstance(rns, str) and _NETNS_RE.match(rns) else None,
        "revision": rrev if type(rrev) is int and 0 <= rrev < 2**63 else None,
        "host_interface": rif if isinstance(rif, str) and _IFNAME_RE.match(rif) else None,
    }
    try:
        model = _SandboxModel.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(_pydantic_problems(f"sandbox {sid!r}: ", e), **ident) from None
    problems: list[str] = []
    if not _ID_RE.match(model.id):
        problems.append(
            f"sandbox id {model.id[:80]!r} is not valid: use 1-128 letters, digits and . _ : @ - "
            "starting with a letter or digit"
        )
    if model.netns is not None and not _NETNS_RE.match(model.netns):
        problems.append(
            f"sandbox {sid!r}: netns {model.netns[:200]!r} must be /run/netns/NAME or /proc/PID/ns/net"
        )
    if model.host_interface is not None and not _IFNAME_RE.match(model.host_interface):
        problems.append(
            f"sandbox {sid!r}: host_interface {model.host_interface[:40]!r} is not an interface name: use "
            "1-15 letters, digits and . _ @ + - starting with a letter or digit (the host end of its veth "
            "or tap), or leave it out"
        )
    np = model.network_policy or _NetworkPolicyModel()
    allow = _parse_list(sid, "allow_out", np.allow_out, max_entries, problems)
    deny = _parse_list(sid, "deny_out", np.deny_out, max_entries, problems)
    if problems:
        raise PolicyError(problems, **ident)
    return Sandbox(
        id=model.id,
        netns=model.netns,
        status=model.status,
        revision=model.revision,
        host_interface=model.host_interface,
        policy=Policy(
            allow_internet_access=np.allow_internet_access,
            allow_out=Targets.from_entries(allow),
            deny_out=Targets.from_entries(deny),
        ),
    )


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upsert:
    sandbox: Sandbox


@dataclass(frozen=True)
class Delete:
    id: str


@dataclass(frozen=True)
class Snapshot:
    """The whole desired state. `rejected` holds the records that failed validation, each with what could
    still be read of its identity: the agent must not forget a sandbox just because its record is broken."""

    sandboxes: tuple[Sandbox, ...]
    rejected: tuple[PolicyError, ...] = ()
    # The source guarantees these are the latest records (a NATS bucket's current values): taken whatever
    # revision the agent knew, so that a bucket made anew, with revisions from 1 again, is not "stale".
    authoritative: bool = False


Event = Upsert | Delete | Snapshot


def parse_line(text: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> Event:
    """One feed line: JSON, then an event. Any input gives an event or a PolicyError, nothing else."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError([f"not valid JSON: {e.msg} at column {e.colno}"]) from None
    except RecursionError:
        raise PolicyError(["JSON nested too deeply"]) from None
    except ValueError as e:  # e.g. an integer longer than Python will convert
        raise PolicyError([f"not usable JSON: {e}"]) from None
    return parse_event(raw, max_entries)


def parse_event(raw: Any, max_entries: int = DEFAULT_MAX_ENTRIES) -> Event:
    """Validate one feed event (upsert, delete or snapshot); raises PolicyError naming what is wrong."""
    if not isinstance(raw, dict):
        raise PolicyError([f"an event must be a JSON object, not {type(raw).__name__}"])
    kind = raw.get("type")
    if kind == "upsert":
        if "sandbox" not in raw:
            raise PolicyError(['upsert event has no "sandbox" record'])
        return Upsert(parse_sandbox(raw["sandbox"], max_entries))
    if kind == "delete":
        sid = raw.get("id")
        if not isinstance(sid, str) or not _ID_RE.match(sid):
            raise PolicyError([f'delete event needs "id", a sandbox id string; got {sid!r:.80}'])
        return Delete(sid)
    if kind == "snapshot":
        items = raw.get("sandboxes")
        if not isinstance(items, list):
            raise PolicyError(['snapshot event needs "sandboxes", a list of sandbox records'])
        out: list[Sandbox] = []
        rejected: list[PolicyError] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                sb = parse_sandbox(item, max_entries)
            except PolicyError as e:
                problems = [f"sandboxes[{i}]: {p}" for p in e.problems]
                rejected.append(PolicyError(problems, e.sandbox_id, e.netns, e.revision, e.host_interface))
                continue
            if sb.id in seen:
                rejected.append(PolicyError([f"sandboxes[{i}]: sandbox {sb.id!r} is listed twice"], sb.id))
                continue
            seen.add(sb.id)
            out.append(sb)
        return Snapshot(tuple(out), tuple(rejected))
    raise PolicyError([f'unknown event type {kind!r:.40}; expected "upsert", "delete" or "snapshot"'])


def targets_to_entries(t: Targets) -> list[str]:
    return [str(n) for n in (*t.nets4, *t.nets6)] + list(t.hostnames)


def sandbox_to_record(sb: Sandbox) -> dict[str, Any]:
    """The record form of a validated sandbox: parse_sandbox(sandbox_to_record(sb)) == sb."""
    record: dict[str, Any] = {
        "id": sb.id,
        "status": sb.status,
        "netns": sb.netns,
        "revision": sb.revision,
        "network_policy": {
            "allow_internet_access": sb.policy.allow_internet_access,
            "allow_out": targets_to_entries(sb.policy.allow_out),
            "deny_out": targets_to_entries(sb.policy.deny_out),
        },
    }
    if sb.host_interface is not None:
        record["host_interface"] = sb.host_interface
    return record
