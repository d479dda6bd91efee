"""Operator configuration: a TOML file validated at the edge into plain dataclasses.

Unknown keys are an error that names the key, so a typo never silently leaves a default (and a sandbox
more open than the operator meant) in force.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from egressd.model.config_file import (
    DEFAULT_GUARD_DENY,
    DEFAULT_GUARD_PRIVATE,
    HOST_ID,
    ConfigFile,
    default_host_id,
)
from egressd.model.entries import IPNetwork, collapse
from egressd.model.sandbox import DEFAULT_MAX_ENTRIES


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key and what to do."""


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
class Intercept:
    """[dns] intercept and its limits (see _Dns)."""

    enabled: bool = True
    port: int = 153
    query_rate: float = 200.0
    max_inflight: int = 64
    tcp_connections: int = 16
    tcp_idle_timeout: float = 10.0
    max_learned: int = 4096
    conn_mark_mask: int = 0xFFFF0000


@dataclass(frozen=True)
class Denials:
    """[denials]: how denied packets are logged by the kernel and kept by the agent (docs/denials.md)."""

    log: bool = True
    group: int = 2
    rate: int = 50
    burst: int = 100
    keep: int = 100
    publish: bool = True  # [events] publish: on the NATS feed's connection, when the feed is nats://
    subject: str = "egressd.denials"  # [events] subject, followed by .<host_id>


@dataclass(frozen=True)
class Config:
    """Everything the agent reads from its config file, flat. Only guard, deny_action, uplink,
    sandbox_resolvers, the intercept settings and denials (but keep) shape the rendered table; the rest is
    how the agent runs."""

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
    intercept: Intercept = field(default_factory=Intercept)
    resync_interval: float = 30.0
    workers: int = 4
    retry_initial: float = 0.2
    retry_max: float = 30.0
    watch_changes: bool = True
    cached_contexts: int = 4
    control_socket: str = "/run/egressd/control.sock"
    denials: Denials = field(default_factory=Denials)
    log_format: str = "json"
    log_level: str = "info"
    metrics_listen: str = "127.0.0.1:9469"  # "" turns metrics off; see parse_listen
    metrics_counters_interval: float = 15.0


def _to_config(m: ConfigFile) -> Config:
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
        intercept=Intercept(
            m.dns.intercept,
            m.dns.proxy_port,
            m.dns.query_rate,
            m.dns.max_inflight,
            m.dns.tcp_connections,
            m.dns.tcp_idle_timeout,
            m.dns.max_learned,
            m.dns.conn_mark_mask,
        ),
        resync_interval=m.reconcile.resync_interval,
        workers=m.reconcile.workers,
        retry_initial=m.reconcile.retry_initial,
        retry_max=m.reconcile.retry_max,
        watch_changes=m.reconcile.watch_changes,
        cached_contexts=m.reconcile.cached_contexts,
        control_socket=m.control.socket,
        denials=Denials(**m.denials.model_dump(), **m.events.model_dump()),
        log_format=m.log.format,
        log_level=m.log.level,
        metrics_listen=m.metrics.listen,
        metrics_counters_interval=m.metrics.counters_interval,
    )


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return _to_config(ConfigFile.model_validate(data))
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
