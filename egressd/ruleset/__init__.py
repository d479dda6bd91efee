"""Stage 4, the ruleset: pure functions from a policy to the nftables table that enforces it, the reference
decision, and explain."""
