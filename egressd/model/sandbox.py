"""The sandbox record from the platform, validated with pydantic into frozen dataclasses (Sandbox, Policy).

Every record that arrives from outside passes through here. A bad one becomes a `PolicyError` that names the
sandbox, the field and the entry, and says what to write instead; nothing past this module sees a raw record.
Its entries are parsed by model/entries.py; the feed's events that carry records are in model/events.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from egressd.model.entries import IPNetwork, collapse, is_pattern, parse_entry

DEFAULT_MAX_ENTRIES = 4096
SANDBOX_STATUSES = ("pending", "running", "snapshotting", "suspending", "suspended", "terminated")
SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NETNS_RE = re.compile(r"^(/run/netns/[A-Za-z0-9][A-Za-z0-9._-]{0,254}|/proc/[1-9][0-9]{0,9}/ns/net)$")
# An interface name the kernel accepts (IFNAMSIZ 16, so 1-15 bytes), limited to the characters veth and tap
# names use in practice: no wildcard, quote or separator can reach nftables.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,14}$")


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


# --- plain dataclasses used inside the agent -------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The destinations of one list (allow_out or deny_out), split by kind and family."""

    nets4: tuple[ipaddress.IPv4Network, ...] = ()
    nets6: tuple[ipaddress.IPv6Network, ...] = ()
    hostnames: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()  # *.example.com: enforced from the sandbox's own DNS answers only

    @classmethod
    def from_entries(cls, entries: Iterable[IPNetwork | str]) -> Targets:
        nets4: list[ipaddress.IPv4Network] = []
        nets6: list[ipaddress.IPv6Network] = []
        hosts: list[str] = []
        patterns: list[str] = []
        for e in entries:
            if isinstance(e, ipaddress.IPv4Network):
                nets4.append(e)
            elif isinstance(e, ipaddress.IPv6Network):
                nets6.append(e)
            elif is_pattern(e):
                patterns.append(e)
            else:
                hosts.append(e)
        return cls(
            nets4=collapse(nets4),  # type: ignore[arg-type]
            nets6=collapse(nets6),  # type: ignore[arg-type]
            hostnames=tuple(sorted(set(hosts))),
            patterns=tuple(sorted(set(patterns))),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Host names and patterns: what only DNS can tell addresses for."""
        return self.hostnames + self.patterns


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
    sid = rid if isinstance(rid, str) and SANDBOX_ID_RE.match(rid) else "?"
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
    if not SANDBOX_ID_RE.match(model.id):
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


def targets_to_entries(t: Targets) -> list[str]:
    return [str(n) for n in (*t.nets4, *t.nets6)] + list(t.hostnames) + list(t.patterns)


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
