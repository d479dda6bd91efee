"""`egressd` with its sandbox tables written one way or the other, for benchmarks that compare the two in
one run (bench.agent --writes both): `python -m bench.agent_writes raw|libnftables -- PYTHON -m egressd ARGS`
runs `egressd ARGS` in this process with kernel.nft.RAW_WRITES set accordingly (the command after `--` is
what tests.integration.agent.AgentProcess appends to its `wrap` prefix). Not a user-facing switch: the
agent as shipped always writes over raw netlink, falling back to libnftables on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MODES = ("raw", "libnftables")


def main(argv: Sequence[str]) -> int:
    if len(argv) < 5 or argv[0] not in MODES or argv[1] != "--" or argv[3:5] != ["-m", "egressd"]:
        print(
            "usage: python -m bench.agent_writes raw|libnftables -- PYTHON -m egressd ARGS...",
            file=sys.stderr,
        )
        return 2
    from egressd.kernel import nft

    nft.RAW_WRITES = argv[0] == "raw"
    from egressd.cli import main as egressd_main

    return egressd_main(list(argv[5:]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
