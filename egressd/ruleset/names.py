"""What a sandbox's DNS query for a name gets, by the policy's own order (allow_out before deny_out), and
which entry decided. The DNS proxy asks here for the question and for every name on an answer's CNAME chain;
`explain` asks here too, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from egressd.model.entries import pattern_matches
from egressd.model.sandbox import Policy, Targets

FORWARD = "forward"  # asked upstream; its addresses are learned when `learn` is set
NXDOMAIN = "nxdomain"  # a deny_out name: the sandbox is told it does not exist
REFUSED = "refused"  # no entry allows it and the internet is off: it never leaves the host


@dataclass(frozen=True)
class NameVerdict:
    action: str  # FORWARD, NXDOMAIN or REFUSED
    step: str  # "allow_out", "deny_out" or "internet"
    entry: str | None = None  # the host name or pattern that matched
    learn: bool = False  # the answer's addresses go into the sandbox's allow sets

    def __str__(self) -> str:
        if self.entry is not None:
            return f"{self.action}: {self.step} {self.entry}"
        state = "true" if self.action == FORWARD else "false"
        return f"{self.action}: allow_internet_access={state} and no host name or pattern matches"


def matching_entry(targets: Targets, name: str) -> str | None:
    """The entry of one list a normalised name falls under: the exact host name first, then the longest
    pattern (the most specific reads best in explain)."""
    if name in targets.hostnames:
        return name
    hits = [p for p in targets.patterns if pattern_matches(p, name)]
    return max(hits, key=len) if hits else None


def judge_name(policy: Policy, name: str) -> NameVerdict:
    """name: normalised (lower case, no trailing dot, A-labels)."""
    entry = matching_entry(policy.allow_out, name)
    if entry is not None:
        return NameVerdict(FORWARD, "allow_out", entry, learn=True)
    entry = matching_entry(policy.deny_out, name)
    if entry is not None:
        return NameVerdict(NXDOMAIN, "deny_out", entry)
    if policy.allow_internet_access:
        return NameVerdict(FORWARD, "internet")
    return NameVerdict(REFUSED, "internet")


def judge_chain(policy: Policy, names: list[str]) -> NameVerdict:
    """A question and the names its answer's CNAME chain passes through, in order: the first that is denied
    decides the whole answer (a CNAME from an allowed name into a denied one is NXDOMAIN). Otherwise the
    question's verdict stands: a chain from an allowed name through names no list names (a CDN's) is
    allowed, and learns for the question's entry."""
    first = judge_name(policy, names[0])
    if first.action != FORWARD:
        return first
    for name in names[1:]:
        verdict = judge_name(policy, name)
        if verdict.action == NXDOMAIN:
            return verdict
    return first
