"""Stage 3, reconcile: make the kernel equal desired state, sandbox by sandbox, with retries; the status
behind status, wait and metrics."""
