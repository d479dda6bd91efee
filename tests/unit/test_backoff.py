"""The one backoff every retry loop uses (reconcile, the fleet feed, DNS)."""

import random

from egressd.common.backoff import Backoff, backoff_delay


def test_delays_double_up_to_the_cap_within_their_jitter():
    rng = random.Random(7)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        d = backoff_delay(attempt, 0.1, 1.0, rng)
        assert 0.5 * ceiling <= d <= ceiling
    assert 0.8 * 60 <= backoff_delay(1000, 1.0, 60.0, rng, low=0.8) <= 60  # no overflow at huge attempts


def test_jitter_spreads_retriers_apart():
    delays = {round(backoff_delay(3, 1.0, 60.0, random.Random(seed)), 6) for seed in range(20)}
    assert len(delays) == 20 and min(delays) >= 4.0 and max(delays) <= 8.0


def test_the_stateful_backoff_counts_and_resets():
    b = Backoff(1.0, 10.0, random.Random(1))
    first = [b.next() for _ in range(5)]
    assert [0.5 <= d / c <= 1.0 for d, c in zip(first, [1, 2, 4, 8, 10], strict=True)] == [True] * 5
    b.reset()
    assert b.failures == 0 and 0.5 <= b.next() <= 1.0
