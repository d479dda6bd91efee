#!/usr/bin/env bash
# Builds dist/egressd_<version>~deb<N>u<U>_<arch>.deb with dpkg-deb (`make deb`). Run as root on the Debian
# release the package is for: Debian 12 or 13 (N, from /etc/os-release; U is DEB_UPDATE, default 1).
#
# One package per release: the venv is made by that release's python3 (3.11 on 12, 3.13 on 13), so its
# site-packages and compiled extensions work with that minor version only, and Depends says so
# (python3 (>= 3.11), python3 (<< 3.12) on 12). The release in the version (0.1.0~deb12u1, 0.1.0~deb13u1)
# tells the two apart, and sorts a release's package below the next release's, so an upgrade of the host
# from 12 to 13 takes the 13 package.
#
# The package holds the agent in its own venv at /opt/egressd, made by the system python3 with
# --system-site-packages (so it sees Debian's python3-nftables) and holding egressd and the pinned PyPI
# dependencies that pyproject.toml lists at build time; /usr/bin/egressd (a symlink to the venv's console
# script); the systemd unit; /etc/egressd/egressd.toml as a conffile; /var/lib/egressd (0700); a
# tmpfiles.d entry for /run/egressd.
#
# A venv records its own absolute path (script shebangs, pyvenv.cfg, the source paths compiled into .pyc
# files), so it is built at /opt/egressd itself, not relocated afterwards: in a private mount namespace
# (unshare --mount) a tmpfs covers /opt (the host's /opt entries are bound back into it, so pip's local
# indexes there keep working), and the staging directory is bound onto /opt/egressd. Nothing on the host
# outside build/ and dist/ is touched, and an egressd already installed at /opt/egressd is left alone.
#
# Work happens in build/deb (removed first); pip's download cache is kept in build/pip-cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PREFIX=/opt/egressd
PY=/usr/bin/python3

fail() {
    echo "build-deb: $*" >&2
    exit 1
}

# --- inside the private mount namespace: make the venv at /opt/egressd ----------------------------------
if [ "${1:-}" = "--venv-in-namespace" ]; then
    stage_prefix=$2 src=$3 hostopt=$4
    mount --make-rprivate /
    mount --bind /opt "$hostopt"
    mount -t tmpfs -o mode=0755 egressd-build /opt
    for entry in "$hostopt"/* "$hostopt"/.[!.]*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        name=${entry##*/}
        [ "$name" = egressd ] && continue
        if [ -d "$entry" ]; then mkdir "/opt/$name"; else touch "/opt/$name"; fi
        mount --bind "$entry" "/opt/$name"
    done
    mkdir "$PREFIX"
    mount --bind "$stage_prefix" "$PREFIX"

    "$PY" -m venv --system-site-packages "$PREFIX"
    export PIP_CACHE_DIR="$ROOT/build/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1
    # A non-editable install of egressd and, from its pyproject.toml, its pinned dependencies.
    "$PREFIX/bin/python" -m pip install -q --no-warn-script-location "$src" \
        2> >(grep -v 'is ignored: it is neither' >&2)
    # pip and setuptools are not needed to run the agent; the package manager owns this venv. Python 3.13's
    # venv has no setuptools: uninstall only what is there.
    tools=$("$PREFIX/bin/python" - <<'PY'
import importlib.metadata as m
for name in ("setuptools", "pip"):
    try:
        m.version(name)
    except m.PackageNotFoundError:
        continue
    print(name)
PY
)
    # shellcheck disable=SC2086  # one word per package name
    "$PREFIX/bin/python" -m pip uninstall -q -y $tools
    # The build's source path; not needed, and the package must not name the build host's paths.
    rm -f "$PREFIX"/lib/python3*/site-packages/egressd-*.dist-info/direct_url.json
    find "$PREFIX" -name __pycache__ -path '*/bin/*' -prune -exec rm -rf {} +

    # Smoke test where it will run: the console script, the venv's packages and Debian's nftables module.
    (cd / && env -u PYTHONPATH "$PREFIX/bin/egressd" --version >/dev/null)
    (cd / && env -u PYTHONPATH "$PREFIX/bin/python" -c 'import nftables, pydantic, egressd.cli') ||
        fail "the venv cannot import nftables (python3-nftables), pydantic or egressd"
    exit 0
fi

# --- outside: checks, staging, control files, dpkg-deb ---------------------------------------------------
[ "$(id -u)" = 0 ] || fail "run as root (the venv is built at $PREFIX inside a private mount namespace)"
for tool in dpkg-deb unshare mount "$PY"; do
    command -v "$tool" >/dev/null || fail "$tool missing"
done
"$PY" -c 'import ensurepip, venv' 2>/dev/null || fail "python3-venv missing (apt-get install python3-venv)"
"$PY" -c 'import nftables' 2>/dev/null || fail "python3-nftables missing (apt-get install python3-nftables)"

version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
init_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' egressd/__init__.py)
[ "$version" = "$init_version" ] ||
    fail "pyproject.toml says version $version, egressd/__init__.py says $init_version"

# shellcheck source=/dev/null
. /etc/os-release
[ "${ID:-}" = debian ] && [ -n "${VERSION_ID:-}" ] ||
    fail "build on Debian 12 or 13: /etc/os-release says ${PRETTY_NAME:-nothing}, with no VERSION_ID"
debversion="${version}~deb${VERSION_ID}u${DEB_UPDATE:-1}"

started=$(date +%s)
work=$ROOT/build/deb
rm -rf "$work"
mkdir -p "$work/src" "$work/hostopt" "$ROOT/dist"
stage=$work/root
umask 022

# A copy of the sources, so pip's in-tree build writes nothing into the checkout.
cp -a pyproject.toml README.md egressd netns_fixtures "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$stage$PREFIX"
[ -d /opt ] || mkdir -m 0755 /opt
unshare --mount --propagation private bash "$ROOT/scripts/build-deb.sh" --venv-in-namespace \
    "$stage$PREFIX" "$work/src" "$work/hostopt"
rmdir "$work/hostopt"
if grep -rlF "$work" "$stage" >/dev/null; then
    fail "the venv still names the build directory: $(grep -rlF "$work" "$stage" | head -5 | tr '\n' ' ')"
fi

# /usr/lib/systemd/system: both releases are merged-/usr (/lib is a link to usr/lib).
install -d -m 0755 "$stage/usr/bin" "$stage/usr/lib/systemd/system" "$stage/etc/egressd" \
    "$stage/usr/lib/tmpfiles.d" "$stage/usr/share/doc/egressd" "$stage/DEBIAN"
ln -s "$PREFIX/bin/egressd" "$stage/usr/bin/egressd"
install -m 0644 packaging/egressd.service "$stage/usr/lib/systemd/system/egressd.service"
install -m 0644 packaging/egressd.toml "$stage/etc/egressd/egressd.toml"
install -d -m 0700 "$stage/var/lib/egressd"
# /run/egressd: the unit's RuntimeDirectory; this entry also makes it at boot, for `egressd status`.
echo "d /run/egressd 0755 root root -" >"$stage/usr/lib/tmpfiles.d/egressd.conf"
install -m 0644 README.md "$stage/usr/share/doc/egressd/README.md"
# The reference the README links to (docs/NAME.md), at the same relative place.
install -d -m 0755 "$stage/usr/share/doc/egressd/docs"
install -m 0644 docs/*.md "$stage/usr/share/doc/egressd/docs/"
cat >"$stage/usr/share/doc/egressd/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: egressd

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

Files: opt/egressd/lib/*
License: various
 The PyPI packages in the venv, each with its license in its *.dist-info directory.
EOF

# Architecture: compiled extensions in the venv (pydantic-core) tie the package to this architecture.
if find "$stage$PREFIX" -name '*.so' -o -name '*.so.*' | grep -q .; then
    arch=$(dpkg --print-architecture)
else
    arch=all
fi
# The lowest glibc the venv's manylinux wheels need, from their WHEEL tags.
glibc=$(cat "$stage$PREFIX"/lib/python3*/site-packages/*.dist-info/WHEEL |
    sed -n 's/^Tag: .*manylinux_\([0-9]*\)_\([0-9]*\)_.*/\1.\2/p' | sort -V | tail -1)
pymajmin=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
# python3 in [this minor, next minor): the venv's site-packages and compiled extensions are for this one.
depends="python3 (>= $pymajmin), python3 (<< $pynext), python3-nftables, libnftables1, nftables, iproute2"
[ -n "$glibc" ] && depends="$depends, libc6 (>= $glibc)"
installed_size=$(du -sk --apparent-size "$stage" | cut -f1)

cat >"$stage/DEBIAN/control" <<EOF
Package: egressd
Version: $debversion
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-egressd maintainers <root@localhost>}
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Description: per-sandbox egress policy as nftables tables
 egressd is a host agent for the dataplane hosts of a sandbox platform. For
 every sandbox on the host it turns the sandbox's network policy into one
 nftables table, inet egressd, inside that sandbox's network namespace, and
 keeps it equal to the policies on its event feed.
 .
 The agent lives in its own Python venv under /opt/egressd, built on the
 system python3 so that it uses Debian's python3-nftables.
EOF
echo /etc/egressd/egressd.toml >"$stage/DEBIAN/conffiles"

# Maintainer scripts: what dh_installsystemd and dh_installtmpfiles generate. The unit is enabled and
# started on first install; on upgrade the running agent is not stopped before unpacking and is restarted
# after it (a SIGTERM leaves every table in force, and the new agent adopts them with zero writes); it is
# stopped only on removal, which leaves the tables in the kernel too.
cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	if [ -x "$(command -v systemd-tmpfiles)" ]; then
		systemd-tmpfiles --create egressd.conf || true
	fi
	if [ -x "$(command -v deb-systemd-helper)" ]; then
		deb-systemd-helper unmask 'egressd.service' >/dev/null || true
		if deb-systemd-helper --quiet was-enabled 'egressd.service'; then
			deb-systemd-helper enable 'egressd.service' >/dev/null || true
		else
			deb-systemd-helper update-state 'egressd.service' >/dev/null || true
		fi
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_action=restart
		else
			_action=start
		fi
		deb-systemd-invoke $_action 'egressd.service' >/dev/null || true
	fi
fi
exit 0
EOF
cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# Only on removal: an upgrade keeps the agent running and postinst restarts it. Stopping never removes
# a table: they stay in force in the kernel.
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop 'egressd.service' >/dev/null || true
fi
exit 0
EOF
cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "remove" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper mask 'egressd.service' >/dev/null || true
	fi
fi
if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge 'egressd.service' >/dev/null || true
		deb-systemd-helper unmask 'egressd.service' >/dev/null || true
	fi
	# Desired state (state.json); the tables in the sandboxes' namespaces are not touched.
	rm -rf /var/lib/egressd
fi
exit 0
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
for s in postinst prerm postrm; do sh -n "$stage/DEBIAN/$s"; done

deb=$ROOT/dist/egressd_${debversion}_${arch}.deb
rm -f "$deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "build-deb: $(du -h "$deb" | cut -f1) in $(($(date +%s) - started)) s; Depends: $depends" >&2
echo "$deb"
