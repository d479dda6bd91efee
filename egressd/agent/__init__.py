"""The agent: the daemon that wires the stages, its control socket, its metrics and process tuning."""
