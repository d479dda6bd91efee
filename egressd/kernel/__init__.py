"""Stage 5, the kernel: namespaces, the libnftables backends and their fake, raw netlink reads, the change
monitor, the host side."""
