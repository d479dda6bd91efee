"""The one shape every benchmark reports its headline figures in, so `python -m bench` makes one table.

Each benchmark module has `summary(results) -> list[Figure]`, reading the dict it wrote with `--json`. A
figure holds the median egressd value and, where there is one, the baseline measured in the same run; the
ratio is derived, never stored twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One line of the suite's table.

    `lower_is_better` says which way the ratio reads: for times it is baseline / egressd (10 means egressd is
    ten times faster), for throughput egressd / baseline (0.97 means 97 % of the baseline).
    """

    bench: str  # module name: apply, agent, dns, hostside, tamper, datapath
    name: str  # what was measured, e.g. "update, K=10, ms per namespace"
    unit: str  # ms, s, MiB, Gbit/s, queries/s, ...
    egressd: float | None
    baseline: float | None = None
    baseline_name: str | None = None  # e.g. "ip netns exec NS nft -j -f FILE"
    goal: str | None = None  # e.g. ">= 15x", "< 100 ms"
    met: bool | None = None  # None: no goal, or not measured
    lower_is_better: bool = True
    note: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.egressd is None or self.baseline is None or self.egressd == 0 or self.baseline == 0:
            return None
        return self.baseline / self.egressd if self.lower_is_better else self.egressd / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}
