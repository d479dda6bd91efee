"""Operator configuration: a TOML file validated at the edge into plain dataclasses.

Unknown keys are an error that names the key, so a typo never silently leaves a default (and a sandbox
more open than the operator meant) in force.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from egressd.policy import DEFAULT_MAX_ENTRIES, IPNetwork, collapse

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


class _Limits(_Strict):
    max_entries: int = Field(default=DEFAULT_MAX_ENTRIES, ge=1, le=1_000_000)


class _ConfigModel(_Strict):
    guard: _Guard = Field(default_factory=_Guard)
    enforce: _Enforce = Field(default_factory=_Enforce)
    limits: _Limits = Field(default_factory=_Limits)


@dataclass(frozen=True)
class Guard:
    """Operator lists that frame every tenant policy (see README, semantics)."""

    deny: tuple[IPNetwork, ...]
    allow: tuple[IPNetwork, ...]
    private: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class Config:
    guard: Guard = field(
        default_factory=lambda: Guard(
            deny=collapse(ipaddress.ip_network(n) for n in DEFAULT_GUARD_DENY),
            allow=(),
            private=collapse(ipaddress.ip_network(n) for n in DEFAULT_GUARD_PRIVATE),
        )
    )
    deny_action: str = "reject"
    uplink: str = "eth0"
    max_entries: int = DEFAULT_MAX_ENTRIES


def _to_config(m: _ConfigModel) -> Config:
    def nets(values: list[str]) -> tuple[IPNetwork, ...]:
        parsed = [ipaddress.ip_network(v, strict=False) for v in values]
        return collapse(parsed)

    return Config(
        guard=Guard(deny=nets(m.guard.deny), allow=nets(m.guard.allow), private=nets(m.guard.private)),
        deny_action=m.enforce.deny_action,
        uplink=m.enforce.uplink,
        max_entries=m.limits.max_entries,
    )


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return _to_config(_ConfigModel.model_validate(data))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{source}: unknown key {key!r}; see the config reference in README.md")
            else:
                problems.append(f"{source}: {key}: {err['msg']}")
        raise ConfigError("\n".join(problems)) from None


def load_config(path: str | Path | None) -> Config:
    """Read the TOML file at path; None gives the built-in defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file; create it or pass --config PATH") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return config_from_dict(data, str(p))
