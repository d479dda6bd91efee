#!/usr/bin/env bash
# Idempotent set-up on Debian 12 or 13: the apt packages egressd, its demo, tests, benchmarks and package
# build run (a minimal image has none of them; scripts/test-on.sh checks this list on one), then a venv in
# .venv built on the system python3 (so it sees Debian's python3-nftables) with the pinned PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    nftables python3-nftables python3-venv python3-pip iproute2 iputils-ping
    tcpdump conntrack netcat-openbsd dnsmasq-base
    iperf3 iptables  # bench/datapath.py: throughput, and the linear-chain baselines (nft and legacy)
    systemd systemd-container  # systemd-analyze; systemd-nspawn boots a systemd PID 1 for the unit test
    nats-server openssl  # tests/integration/test_fleet.py: a real JetStream server, and TLS certificates
    procps  # sysctl (the demo's and the tests' worlds), pgrep
    make  # `make deb`, which tests/integration/test_deb.py runs
    strace  # tests/integration/test_nfnl_{batch,sandbox}.py: libnftables' own batches, byte for byte
)

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (apt packages, network namespaces)" >&2
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" nats-server "* ]] && [ -d /run/systemd/system ]; then
        # Debian starts the package's own server on port 4222; the tests run theirs on free loopback ports.
        systemctl disable --now nats-server.service >/dev/null 2>&1 || true
    fi
fi

stamp=.venv/.egressd-setup
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' 2> >(grep -v 'is ignored: it is neither' >&2)
    touch "$stamp"
fi
