"""The config file's schema: every table and key of the TOML file, with its type, bounds and default.

Pydantic at the edge: model/config.py validates a file against ConfigFile and turns it into the plain,
frozen Config the agent uses. Unknown keys are refused (extra="forbid").
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    # DNS interception (docs/hostnames.md#interception): egressd answers every DNS query of a sandbox whose
    # policy names a host name or pattern.
    intercept: bool = True
    proxy_port: int = Field(default=153, ge=1, le=1023)  # below 1024: no unprivileged process takes it first
    query_rate: float = Field(default=200.0, gt=0, le=100_000)  # per sandbox per second, bursts of as many
    max_inflight: int = Field(default=64, ge=1, le=10_000)  # per sandbox: queries waiting for upstream
    tcp_connections: int = Field(default=16, ge=1, le=10_000)  # per sandbox
    tcp_idle_timeout: float = Field(default=10.0, gt=0, le=3600)
    max_learned: int = Field(default=4096, ge=16, le=1_000_000)  # per sandbox and family: the sets' size
    # The conntrack mark bits that carry a policy's generation, in every sandbox's table: an accepted
    # connection is let through until the policy changes (ruleset/generation.py). 8-16 contiguous bits.
    conn_mark_mask: int = Field(default=0xFFFF0000, ge=1, le=0xFFFFFFFF, strict=True)

    @field_validator("conn_mark_mask")
    @classmethod
    def _contiguous(cls, v: int) -> int:
        low = v & -v
        if (v + low) & v or not 8 <= bin(v).count("1") <= 16:
            raise ValueError(f"must be one contiguous run of 8 to 16 bits, such as 0xffff0000, not {v:#x}")
        return v

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
    cached_contexts: int = Field(default=4, ge=1, le=800, strict=True)


class _Denials(_Strict):
    # Log every denied packet to NFLOG (docs/denials.md): a chain per deny step in each sandbox's table.
    log: bool = Field(default=True, strict=True)
    group: int = Field(
        default=2, ge=0, le=65535, strict=True
    )  # the NFLOG group, in every sandbox's namespace
    rate: int = Field(
        default=50, ge=1, le=100_000, strict=True
    )  # packets logged per second, per sandbox and step
    burst: int = Field(default=100, ge=1, le=100_000, strict=True)
    keep: int = Field(default=100, ge=1, le=10_000, strict=True)  # events the agent keeps per sandbox


class _Events(_Strict):
    # With a nats:// feed, denial events are also published on SUBJECT.<host_id> (docs/denials.md).
    publish: bool = Field(default=True, strict=True)
    subject: str = Field(
        default="egressd.denials", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length=200
    )


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


class ConfigFile(_Strict):
    guard: _Guard = Field(default_factory=_Guard)
    enforce: _Enforce = Field(default_factory=_Enforce)
    limits: _Limits = Field(default_factory=_Limits)
    feed: _Feed = Field(default_factory=_Feed)
    state: _State = Field(default_factory=_State)
    dns: _Dns = Field(default_factory=_Dns)
    reconcile: _Reconcile = Field(default_factory=_Reconcile)
    control: _Control = Field(default_factory=_Control)
    denials: _Denials = Field(default_factory=_Denials)
    events: _Events = Field(default_factory=_Events)
    log: _Log = Field(default_factory=_Log)
    metrics: _Metrics = Field(default_factory=_Metrics)
