#!/usr/bin/env bash
# scripts/test-on.sh RELEASE [COMMAND...]: the README's Quick start (set-up, the demo, the whole suite), or
# COMMAND, in a throwaway minimal Debian RELEASE root (bookworm = 12, trixie = 13) on this kernel. As root.
#
# The root is made with debootstrap --variant=minbase (what a minimal image has: no procps, no make), cached
# in build/roots/RELEASE, and copied to a throwaway build/roots/RELEASE-run.PID for each run, with a copy of
# this checkout (tracked and untracked files, no .venv) at /src/egressd. The run happens in a new mount
# namespace (unshare --mount): the root is bind-mounted onto itself (`ip netns exec` needs it to be a mount
# point) and made the namespace's root with pivot_root, not chroot, so that user namespaces work and
# `nsenter --mount` into a namespace made inside lands in the new root. It stays in the host's pid namespace:
# the change monitor tells the agent's own commits apart by the pid the kernel reports, which it can only
# compare there, and the tests check that. Every process of the run is kept in a cgroup of its own (cgroup
# v2), so ending this script (also on Ctrl-C or SIGTERM) kills all of them (cgroup.kill), and the throwaway
# root is removed; network namespaces and /run/netns live in the run's mount namespace and go with it. The
# host's network namespace is shared, so apt and pip reach their registries.
#
# Output goes to the terminal and to build/test-on-RELEASE.log; the exit status is COMMAND's. A .deb the run
# built (`make deb`) is copied to this checkout's dist/ before the root is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

fail() {
    echo "test-on: $*" >&2
    exit 2
}

# --- inside the new mount and pid namespaces: make RUN the root, then run the command ------------------------
if [ "${1:-}" = "--inside" ]; then
    run=$2
    shift 2
    mount --make-rprivate /
    mount --bind "$run" "$run"
    mount -t proc proc "$run/proc"  # this pid namespace's, like the host's /proc
    mount --rbind /sys "$run/sys"
    mount --rbind /dev "$run/dev"
    mount -t tmpfs -o mode=0755 run "$run/run"
    mount -t tmpfs -o mode=1777 tmp "$run/tmp"
    mkdir -p "$run/run/lock" "$run/.old-root"
    cd "$run"
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    cd /src/egressd
    exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        TERM="${TERM:-dumb}" CI="${CI:-}" DEBIAN_FRONTEND=noninteractive "$@"
fi

release=${1:-}
case $release in
    bookworm | trixie) shift ;;
    *) fail "usage: scripts/test-on.sh bookworm|trixie [COMMAND...]" ;;
esac
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, mount and pid namespaces)"
if [ $# -eq 0 ]; then
    set -- bash -c 'bash scripts/setup.sh && bash scripts/demo.sh && bash scripts/test.sh'
fi

if ! command -v debootstrap >/dev/null || [ ! -e "/usr/share/debootstrap/scripts/$release" ]; then
    echo "test-on: installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
fi

base=$ROOT/build/roots/$release
if [ ! -x "$base/usr/bin/apt-get" ]; then
    echo "test-on: debootstrap $release (minbase) into $base, once; later runs reuse it" >&2
    rm -rf "$base.tmp"
    mkdir -p "$(dirname "$base")"
    debootstrap --variant=minbase "$release" "$base.tmp" "$MIRROR" >"$ROOT/build/roots/$release.debootstrap.log" 2>&1 ||
        fail "debootstrap failed: see build/roots/$release.debootstrap.log"
    rm -rf "$base"
    mv "$base.tmp" "$base"
fi

run=$ROOT/build/roots/$release-run.$$
child=
cgroot=$(findmnt -rn -t cgroup2 -o TARGET | head -n 1)
[ -n "$cgroot" ] || fail "no cgroup v2 hierarchy mounted: it is what keeps every process of the run"
cg=$cgroot/egressd-test-on.$$
cleanup() {
    trap - EXIT INT TERM
    if [ -d "$cg" ]; then
        echo 1 >"$cg/cgroup.kill" 2>/dev/null || true  # every process of the run, however it forked
        for _ in $(seq 100); do
            [ -s "$cg/cgroup.procs" ] || break
            sleep 0.1
        done
    fi
    [ -n "$child" ] && wait "$child" 2>/dev/null || true
    [ -d "$cg" ] && { rmdir "$cg" 2>/dev/null || echo "test-on: cgroup $cg still busy" >&2; }
    # The run's mounts were made in its own mount namespace; none should be visible here. If one is, it is
    # unmounted before anything is removed, and rm never crosses into another file system.
    # A package the run built (make deb, test_deb.py) is this release's: keep it in the host's dist/.
    for deb in "$run"/src/egressd/dist/*.deb; do
        [ -f "$deb" ] && mkdir -p "$ROOT/dist" && cp "$deb" "$ROOT/dist/" && echo "test-on: kept dist/${deb##*/}" >&2
    done
    { findmnt -rn -o TARGET | grep -F "$run" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "test-on: a throwaway copy of the $release root at $run" >&2
cp -a "$base" "$run"
cp /etc/resolv.conf "$run/etc/resolv.conf"
# The host's trusted CAs, as a local CA of the root: a registry reached through a TLS proxy needs its CA,
# and the root's ca-certificates (installed by set-up) adds every certificate found here to its bundle.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$run/usr/local/share/ca-certificates"
    cp /etc/ssl/certs/ca-certificates.crt "$run/usr/local/share/ca-certificates/test-on-host.crt"
fi
# The host's apt network settings (a proxy, a registry's Valid-Until policy), nothing else of its apt.
for f in /etc/apt/apt.conf.d/*; do
    if [ -f "$f" ] && grep -q '^Acquire::' "$f"; then cp "$f" "$run/etc/apt/apt.conf.d/"; fi
done
mkdir -p "$run/src/egressd"
git ls-files -z --cached --others --exclude-standard | grep -zv '^\.venv/' |
    tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$run/src/egressd"

log=$ROOT/build/test-on-$release.log
echo "test-on: running in $release: $*" >&2
mkdir "$cg"
# The child joins the cgroup before it execs the run, so nothing of the run starts outside it.
bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" unshare --mount --propagation private \
    bash "$ROOT/scripts/test-on.sh" --inside "$run" "$@" > >(tee "$log") 2>&1 &
child=$!
status=0
wait "$child" || status=$?
child=
echo "test-on: $release: exit status $status (log: build/test-on-$release.log)" >&2
exit "$status"
