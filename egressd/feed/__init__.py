"""Stage 1, the feed: where sandbox events come from (a file, stdin, a unix socket, a NATS key-value
bucket), cut into lines."""
