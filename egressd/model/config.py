"""Operator configuration: a TOML file validated at the edge into plain dataclasses.

Unknown keys are an error that names the key, so a typo never silently leaves a default (and a sandbox
more open than the operator meant) in force.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from egressd.model.entries import IPNetwork, collapse
from egressd.model.sandbox import DEFAULT_MAX_ENTRIES

DEFAULT_GUARD_DENY = ("169.254.0.0/16", "fd00:ec2::254/128")
DEFAULT_GUARD_PRIVATE = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key and what to do."""


def _nets(values: list[str], key: str) -> list[str]:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueError(f"{key}: {v!r} is not an address or CIDR") from None
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Guard(_Strict):
    deny: list[str] = Field(default_factory=lambda: list(DEFAULT_GUARD_DENY))
    allow: list[str] = Field(default_factory=list)
    private: list[str] = Field(default_factory=lambda: list(DEFAULT_GUARD_PRIVATE))

    @field_validator("deny", "allow", "private")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        return _nets(v, "guard")


class _Enforce(_Strict):
    deny_action: Literal["reject", "drop"] = "reject"
    uplink: str = Field(default="eth0", min_length=1, max_length=15, pattern=r"^[A-Za-z0-9._@-]+$")
    # The packet mark bit the host-side tables set on what they deny (see hostside.py). One bit that
    # nothing else on the host uses.
    host_mark: int = Field(default=0x00100000, ge=1, le=0x80000000, strict=True)

    @field_validator("host_mark")
    @classmethod
    def _one_bit(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a single bit, such as 0x00100000, not {v:#x}")
        return v


class _Limits(_Strict):
    max_entries: int = Field(default=DEFAULT_MAX_ENTRIES, ge=1, le=1_000_000)


# [feed.nats] host_id. No dot: keys are HOST_ID.SANDBOX_ID, and one host's prefix must never be the start of
# another's keys.
HOST_ID = r"[A-Za-z0-9_-]{1,64}"


def default_host_id() -> str:
    """The hostname up to its first dot: what [feed.nats] host_id is when it is not set."""
    return socket.gethostname().split(".", 1)[0]


class _FeedNats(_Strict):
    bucket: str = Field(default="egressd-sandboxes", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    host_id: str = Field(default="", pattern=rf"^({HOST_ID})?$")  # "": default_host_id()
    creds: str = ""  # a .creds file (user JWT and NKey seed), as `nsc` writes it
    nkey: str = ""  # a file holding an NKey user seed (SU...)
    tls_ca: str = ""  # CA bundle to verify the server with (tls:// or any tls_* turns TLS on)
    tls_cert: str = ""  # client certificate, for servers that verify clients
    tls_key: str = ""
    connect_timeout: float = Field(default=2.0, gt=0, le=60)
    retry_initial: float = Field(default=0.5, gt=0, le=60)
    retry_max: float = Field(default=30.0, gt=0, le=3600)


class _Feed(_Strict):
    source: str = Field(default="unix:/run/egressd/feed.sock", min_length=1)
    max_line_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    nats: _FeedNats = Field(default_factory=_FeedNats)


class _State(_Strict):
    dir: str = Field(default="/var/lib/egressd", min_length=1)


class _Dns(_Strict):
    nameservers: list[str] = Field(default_factory=list)
    min_ttl: float = Field(default=5.0, ge=0.1, le=86400)
    max_ttl: float = Field(default=300.0, ge=0.1, le=86400)
    retention: float = Field(default=600.0, ge=0, le=86400 * 7)
    timeout: float = Field(default=2.0, gt=0, le=60)
    sandbox_resolvers: list[str] = Field(default_factory=list)

    @field_validator("nameservers")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        for ns in v:
            try:
                ipaddress.ip_address(ns)
            except ValueError:
                raise ValueError(f"dns.nameservers: {ns!r} is not an IP address") from None
        return v

    @field_validator("sandbox_resolvers")
    @classmethod
    def _check_resolvers(cls, v: list[str]) -> list[str]:
        return _nets(v, "dns.sandbox_resolvers")


class _Reconcile(_Strict):
    resync_interval: float = Field(default=30.0, ge=0.1, le=86400)
    workers: int = Field(default=4, ge=1, le=64)
    retry_initial: float = Field(default=0.2, gt=0, le=60)
    retry_max: float = Field(default=30.0, gt=0, le=3600)
    # Repair a table changed inside a sandbox as soon as nftables reports the change (see monitor.py),
    # not only at the next resync. Strict: a quoted "false" is an error, not a truthy string.
    watch_changes: bool = Field(default=True, strict=True)
    # libnftables contexts kept open (one per namespace, the most recently used): each holds about 0.7 MiB
    # once it has written, and making one again costs about 0.4 ms.
    cached_contexts: int = Field(default=32, ge=1, le=800, strict=True)


class _Control(_Strict):
    socket: str = Field(default="/run/egressd/control.sock", min_length=1)


class _Log(_Strict):
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


def parse_listen(value: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port` -> (host, port); "" -> None (metrics off). ValueError says what to write."""
    if value == "":
        return None
    hint = 'give "HOST:PORT", e.g. "127.0.0.1:9469" or "[::1]:9469", or "" to turn metrics off'
    if "/" in value:
        raise ValueError(f"{value!r}: not a URL; {hint}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r}: an IPv6 address in brackets must be followed by :PORT; {hint}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address; {hint}") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r}: no port; {hint}")
        if ":" in host:
            raise ValueError(f'{value!r}: put an IPv6 address in brackets, e.g. "[::1]:9469"')
        if not all(c.isalnum() or c in ".-" for c in host):
            raise ValueError(f"{value!r}: {host!r} is not an address or host name; {hint}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port {port!r} must be a number from 1 to 65535; {hint}")
    return host, int(port)


class _Metrics(_Strict):
    listen: str = "127.0.0.1:9469"
    # Seconds between reads of every sandbox's `denied` counter; 0 turns the per-sandbox series off.
    counters_interval: float = Field(default=15.0, ge=0, le=3600)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("counters_interval")
    @classmethod
    def _check_interval(cls, v: float) -> float:
        if 0 < v < 0.1:
            raise ValueError("must be 0 (off) or at least 0.1 seconds")
        return v


class _ConfigModel(_Strict):
    guard: _Guard = Field(default_factory=_Guard)
    enforce: _Enforce = Field(default_factory=_Enforce)
    limits: _Limits = Field(default_factory=_Limits)
    feed: _Feed = Field(default_factory=_Feed)
    state: _State = Field(default_factory=_State)
    dns: _Dns = Field(default_factory=_Dns)
    reconcile: _Reconcile = Field(default_factory=_Reconcile)
    control: _Control = Field(default_factory=_Control)
    log: _Log = Field(default_factory=_Log)
    metrics: _Metrics = Field(default_factory=_Metrics)


@dataclass(frozen=True)
class Guard:
    """Operator lists that frame every tenant policy (see docs/semantics.md)."""

    deny: tuple[IPNetwork, ...]
    allow: tuple[IPNetwork, ...]
    private: tuple[IPNetwork, ...]


def _nets_of(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return collapse(ipaddress.ip_network(v, strict=False) for v in values)


@dataclass(frozen=True)
class NatsFeed:
    """[feed.nats]: how a nats:// feed source finds and watches this host's keys."""

    bucket: str = "egressd-sandboxes"
    host_id: str = field(default_factory=default_host_id)
    creds: str = ""
    nkey: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    connect_timeout: float = 2.0
    retry_initial: float = 0.5
    retry_max: float = 30.0


@dataclass(frozen=True)
class Config:
    """Everything the agent reads from its config file, flat. Only guard, deny_action, uplink and
    sandbox_resolvers shape the rendered table; the rest is how the agent runs."""

    guard: Guard = field(
        default_factory=lambda: Guard(
            deny=_nets_of(DEFAULT_GUARD_DENY), allow=(), private=_nets_of(DEFAULT_GUARD_PRIVATE)
        )
    )
    deny_action: str = "reject"
    uplink: str = "eth0"
    host_mark: int = 0x00100000
    max_entries: int = DEFAULT_MAX_ENTRIES
    feed_source: str = "unix:/run/egressd/feed.sock"
    max_line_bytes: int = 1024 * 1024
    nats: NatsFeed = field(default_factory=NatsFeed)
    state_dir: str = "/var/lib/egressd"
    dns_nameservers: tuple[str, ...] = ()
    dns_min_ttl: float = 5.0
    dns_max_ttl: float = 300.0
    dns_retention: float = 600.0
    dns_timeout: float = 2.0
    sandbox_resolvers: tuple[IPNetwork, ...] = ()
    resync_interval: float = 30.0
    workers: int = 4
    retry_initial: float = 0.2
    retry_max: float = 30.0
    watch_changes: bool = True
    cached_contexts: int = 32
    control_socket: str = "/run/egressd/control.sock"
    log_format: str = "json"
    log_level: str = "info"
    metrics_listen: str = "127.0.0.1:9469"  # "" turns metrics off; see parse_listen
    metrics_counters_interval: float = 15.0


def _to_config(m: _ConfigModel) -> Config:
    if m.dns.min_ttl > m.dns.max_ttl:
        raise ConfigError(f"dns.min_ttl ({m.dns.min_ttl}) is larger than dns.max_ttl ({m.dns.max_ttl})")
    if m.reconcile.retry_initial > m.reconcile.retry_max:
        raise ConfigError("reconcile.retry_initial is larger than reconcile.retry_max")
    nats = m.feed.nats
    if nats.retry_initial > nats.retry_max:
        raise ConfigError("feed.nats.retry_initial is larger than feed.nats.retry_max")
    if bool(nats.tls_cert) != bool(nats.tls_key):
        raise ConfigError("feed.nats: tls_cert and tls_key go together; set both or neither")
    if nats.creds and nats.nkey:
        raise ConfigError("feed.nats: set creds or nkey, not both")
    host_id = nats.host_id or default_host_id()
    fleet = m.feed.source.startswith(("nats://", "tls://"))  # other feeds never use the host id
    if fleet and not re.fullmatch(HOST_ID, host_id):
        raise ConfigError(
            f"feed.nats.host_id: the hostname {host_id!r} cannot be a key prefix; set host_id to letters, "
            "digits, _ and - (at most 64)"
        )
    return Config(
        guard=Guard(
            deny=_nets_of(m.guard.deny), allow=_nets_of(m.guard.allow), private=_nets_of(m.guard.private)
        ),
        deny_action=m.enforce.deny_action,
        host_mark=m.enforce.host_mark,
        uplink=m.enforce.uplink,
        max_entries=m.limits.max_entries,
        feed_source=m.feed.source,
        max_line_bytes=m.feed.max_line_bytes,
        nats=NatsFeed(**(nats.model_dump() | {"host_id": host_id})),
        state_dir=m.state.dir,
        dns_nameservers=tuple(m.dns.nameservers),
        dns_min_ttl=m.dns.min_ttl,
        dns_max_ttl=m.dns.max_ttl,
        dns_retention=m.dns.retention,
        dns_timeout=m.dns.timeout,
        sandbox_resolvers=_nets_of(m.dns.sandbox_resolvers),
        resync_interval=m.reconcile.resync_interval,
        workers=m.reconcile.workers,
        retry_initial=m.reconcile.retry_initial,
        retry_max=m.reconcile.retry_max,
        watch_changes=m.reconcile.watch_changes,
        cached_contexts=m.reconcile.cached_contexts,
        control_socket=m.control.socket,
        log_format=m.log.format,
        log_level=m.log.level,
        metrics_listen=m.metrics.listen,
        metrics_counters_interval=m.metrics.counters_interval,
    )


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return _to_config(_ConfigModel.model_validate(data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{source}: unknown key {key!r}; see docs/configuration.md for every key")
            else:
                problems.append(f"{source}: {key}: {err['msg']}")
        raise ConfigError("\n".join(problems)) from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at path (None: built-in defaults), then apply command-line overrides on top."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file; create it or pass --config PATH") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return config_from_dict(_merge(data, overrides or {}), source)
