"""egressd: per-sandbox egress policy as one atomic nftables table in each sandbox's network namespace."""

__version__ = "0.1.0"
