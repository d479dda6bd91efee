"""Stage 2, desired state: what each sandbox should have, what survives a restart (the state file), and
what its host names stand for (the DNS cache)."""
