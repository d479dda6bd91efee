"""The policy's generation in the conntrack mark: how a sandbox's table stops judging a connection it has
already judged, without letting a changed policy spare it (docs/semantics.md, Open connections).

Every rule of `decide` that accepts goes to the chain `admit`, which marks the connection with the generation
of the policy in force and accepts; the base chains accept a packet whose connection carries the current
generation before anything else: after its first packet a connection costs one comparison. The mark is set in
a rule of its own: a packet conntrack has no entry for (invalid, untracked) breaks any rule that reads the
mark, and must still be accepted by the accept that follows. Any policy change makes another generation, so
the new table judges every open connection again (and cuts what it no longer allows).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from egressd.ruleset.exprs import ACCEPT, CT_MARK, Json, T, rule

ADMIT = "admit"  # the per-variant chain every accepting step of `decide` goes to


def generation(digest: str, names: Iterable[str], mask: int) -> int:
    """A policy's generation, in the mask's bits, never 0: from a digest of its table and of the names it
    allows (which its table does not show), so a changed policy has another (one chance in 65,535 of the
    same, with the default mask) and a restart the same."""
    shift, seed = (mask & -mask).bit_length() - 1, "\n".join((digest, *names)).encode()
    span = mask >> shift
    return (int(hashlib.sha256(seed).hexdigest()[:12], 16) % span + 1) << shift


class Marks:
    """The two expressions that carry a generation, made once per table and shared by every rule that uses
    them, so the generation (known only once the table is rendered and digested) is set in one place."""

    def __init__(self, mask: int) -> None:
        keep = {"&": [CT_MARK, 0xFFFFFFFF ^ mask]}
        self._check: Json = {"op": "==", "left": {"&": [CT_MARK, mask]}, "right": 0}
        self._value: list[object] = [keep, 0]
        self.accept: tuple[Json, ...] = ({"goto": {"target": ADMIT}},)
        self.carried: tuple[Json, ...] = ({"match": self._check}, ACCEPT)

    def admit(self) -> list[Json]:
        """The chain `admit`: mark (a rule of its own, see above), then accept."""
        mark = {"mangle": {"key": CT_MARK, "value": {"|": self._value}}}
        return [{"add": {"chain": {**T, "name": ADMIT}}}, rule(ADMIT, mark), rule(ADMIT, ACCEPT)]

    def set(self, value: int) -> None:
        """Put the generation into every rule rendered with these marks (0 until then: the shape's form)."""
        self._check["right"] = value
        self._value[1] = value
