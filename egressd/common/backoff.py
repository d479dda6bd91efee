"""One jittered, capped, doubling backoff for every retry loop: the reconciler's, the fleet feed's, DNS."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random, low: float = 0.5) -> float:
    """The delay before retry number `attempt` (0 for the first): `initial` doubling up to `cap`, drawn from
    [low, 1] of it so that many retrying at once never retry in step."""
    return min(cap, initial * 2 ** min(attempt, 32)) * rng.uniform(low, 1.0)


class Backoff:
    """backoff_delay with its own count of failures in a row, reset when a try held."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = backoff_delay(self.failures, self.initial, self.cap, self._rng)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
