"""DNS interception: egressd answers every DNS query of a sandbox whose policy names hosts."""
