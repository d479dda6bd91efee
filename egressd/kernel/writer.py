"""The one apply algorithm, for every table egressd writes: plan (ruleset/transactions.py), run each step,
and remember what is in force so the next update needs no read.

A backend hands in how to run one transaction where a table lives and how to list it; this module decides
what to run. Memory is per place and tied to its identity (a namespace's inode): a namespace made again
under the same path starts from a listing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from egressd.kernel.backend import ApplyError
from egressd.ruleset.exprs import Json
from egressd.ruleset.render import Ruleset
from egressd.ruleset.transactions import (
    Elements,
    Plan,
    Written,
    plan_after,
    plan_apply,
    plan_elements,
)
from egressd.ruleset.variants import NETNS, Target


class Runner(Protocol):
    def run(self, where: str, commands: list[Json], what: str) -> None:
        """One transaction where the table lives; ApplyError when nftables refuses it (nothing applied)."""

    def read(self, where: str) -> list[Json] | None:
        """The table as listed there, or None when there is none."""


class TableWriter:
    """Runs plans for a Runner. `ident` names what `where` is now (None: always the same thing);
    `target_for` says which table a place holds."""

    def __init__(
        self,
        runner: Runner,
        ident: Callable[[str], Hashable] = lambda where: None,
        target_for: Callable[[str], Target] = lambda where: NETNS,
    ) -> None:
        self._runner = runner
        self._ident = ident
        self._target_for = target_for
        self._written: dict[str, tuple[Hashable, Written]] = {}

    def apply(
        self, where: str, ruleset: Ruleset, elements: Elements | None, listing: list[Json] | None
    ) -> None:
        """With `listing`, what the kernel holds decides what is retired. Without it, what this writer
        wrote last decides, which saves a read; should the kernel disagree, a transaction fails, nothing of
        it happens, and the apply is done again from a fresh listing."""
        target = self._target_for(where)
        remembered = self._written.get(where)
        if listing is None and remembered is not None and remembered[0] == self._ident(where):
            try:
                self._run(where, plan_after(ruleset, elements, remembered[1], target))
                return
            except ApplyError:
                pass
        if listing is None:
            listing = self._runner.read(where)
        self._run(where, plan_apply(ruleset, elements, listing, target))

    def _run(self, where: str, plan: Plan) -> None:
        """Every step in order; the memory is written only once the last one was accepted."""
        self._written.pop(where, None)
        for step in plan.steps:
            self._runner.run(where, step.commands, step.what)
        self._written[where] = (self._ident(where), plan.written)

    def update_elements(self, where: str, add: Elements, delete: Elements, variant: str) -> None:
        step = plan_elements(add, delete, variant, self._target_for(where))
        if step is not None:
            self._runner.run(where, step.commands, step.what)

    def forget(self, where: str) -> None:
        self._written.pop(where, None)
