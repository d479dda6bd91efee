"""The Debian package: `make deb` builds it, its control data and contents are checked, and it is unpacked
into a scratch root whose installed agent is run.

Running the unpacked agent honestly. A venv is not relocatable: the console scripts' shebangs, pyvenv.cfg
and the paths compiled into its .pyc files all say /opt/egressd. `dpkg -x` puts it at SCRATCH/opt/egressd,
where it would not run as installed. A chroot into SCRATCH would need a whole Debian in it (python3,
python3-nftables, libnftables, libc: a debootstrap of minutes), so instead each command runs in a private
mount namespace (`unshare --mount`) in which a tmpfs covers /opt and SCRATCH/opt/egressd is bound onto
/opt/egressd: exactly the files the package installs, at the path they were built for, on this host's
system python3 and python3-nftables, which are what the package's Depends bring. The host's /opt is not
changed, and the checkout is not on the path (commands run from /, without PYTHONPATH, and the test checks
where each module was imported from).

The maintainer scripts are run too, with the systemd tools replaced by stubs that log their calls and
with /run (and, for purge, /var/lib) on a tmpfs of their own mount namespace.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import egressd
from tests.integration.conftest import nft_json

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PREFIX = "/opt/egressd"
# The package is built for the release it is built on, with that release's python3 (3.11 on 12, 3.13 on 13).
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PY_NEXT = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
SITE = f"opt/egressd/lib/python{PY}/site-packages"
OS_RELEASE = dict(
    line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
)
DEB_VERSION = f"{VERSION}~deb{OS_RELEASE['VERSION_ID'].strip(chr(34))}u1"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

if shutil.which("dpkg-deb") is None or shutil.which("unshare") is None:
    pytest.skip("dpkg-deb or unshare missing", allow_module_level=True)


@pytest.fixture(scope="module")
def deb() -> Path:
    """A fresh build with `make deb` (about 20-40 s; pip's cache, if it downloads anything, is build/pip-cache)."""
    out = subprocess.run(["make", "-s", "deb"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Skipping" not in out.stderr, out.stderr  # pip uninstalling what a venv never had (Python 3.13)
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.parent == ROOT / "dist" and path.is_file(), out.stdout
    return path


@pytest.fixture(scope="module")
def scratch(deb, tmp_path_factory) -> Path:
    """The package unpacked with `dpkg -x` into an empty scratch root."""
    root = tmp_path_factory.mktemp("scratch-root")
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=120)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def contents(deb: Path) -> dict[str, tuple[str, str, str]]:
    """`dpkg-deb -c`: path (without the leading '.') to (mode, owner, symlink target or '')."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    entries = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        entries[path.removeprefix(".").rstrip("/") or "/"] = (mode, owner, target)
    return entries


def run_installed(scratch: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """argv in a private mount namespace where SCRATCH/opt/egressd is /opt/egressd (see the docstring)."""
    script = (
        'mount -t tmpfs -o mode=0755 egressd-test /opt; mkdir /opt/egressd; mount --bind "$0" /opt/egressd; '
        'cd /; exec "$@"'
    )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script,
            str(scratch / PREFIX[1:]),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=CLEAN_ENV,
    )


def test_the_file_name_and_control_fields(deb):
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    # pydantic-core is a compiled extension: the package is for this architecture, not `all`.
    assert deb.name == f"egressd_{DEB_VERSION}_{arch}.deb"
    assert egressd.__version__ == VERSION
    assert field(deb, "Package") == "egressd"
    assert field(deb, "Version") == DEB_VERSION  # e.g. 0.1.0~deb12u1: one package per Debian release
    assert field(deb, "Architecture") == arch
    assert field(deb, "Maintainer")
    assert field(deb, "Description").startswith("per-sandbox egress policy")
    assert int(field(deb, "Installed-Size")) > 1000  # KiB

    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    # The venv is tied to the system python3's minor version (its site-packages and pydantic-core's ABI).
    assert f"python3 (>= {PY})" in depends and f"python3 (<< {PY_NEXT})" in depends
    for name in ("python3-nftables", "libnftables1", "nftables", "iproute2"):
        assert name in depends, depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends
    # Every package named is a Debian package that exists (known to apt or installed here).
    for d in depends:
        name = d.split()[0]
        known = subprocess.run(["apt-cache", "show", name], capture_output=True, timeout=60).returncode == 0
        installed = subprocess.run(["dpkg-query", "-W", name], capture_output=True).returncode == 0
        assert known or installed, name


def test_the_conffile_and_the_maintainer_scripts(deb, tmp_path):
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.split() == ["/etc/egressd/egressd.toml"]
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert sorted(p.name for p in control.iterdir()) == [
        "conffiles",
        "control",
        "postinst",
        "postrm",
        "prerm",
    ]
    for name in ("postinst", "prerm", "postrm"):
        script = control / name
        assert os.access(script, os.X_OK), name
        assert script.read_text().startswith("#!/bin/sh\nset -e\n"), name
        subprocess.run(["sh", "-n", str(script)], check=True)


def _maintainer_script(tmp_path, deb, name: str, *args: str, systemd: bool = True, state: bool = False):
    """Runs a maintainer script with stubs for the systemd tools; returns the calls they logged."""
    control = tmp_path / "DEBIAN"
    if not control.exists():
        subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    for tool in ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "systemd-tmpfiles"):
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 0\n')
        stub.chmod(0o755)
    setup = "mount -t tmpfs egressd-test /run; "
    if systemd:
        setup += "mkdir -p /run/systemd/system; "
    if state:
        setup += "mount -t tmpfs egressd-test /var/lib; mkdir -m 0700 /var/lib/egressd; "
        setup += "echo '{}' > /var/lib/egressd/state.json; "
    check_state = "; test -e /var/lib/egressd && echo STATE-KEPT || echo STATE-GONE" if state else ""
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", f'{setup}sh "$@"{check_state}']
    out = subprocess.run(
        [*argv, "-", str(control / name), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**CLEAN_ENV, "PATH": f"{stubs}:{CLEAN_ENV['PATH']}"},
    )
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines(), out.stdout


def test_install_enables_and_starts_the_unit(deb, tmp_path):
    calls, _ = _maintainer_script(tmp_path, deb, "postinst", "configure")
    assert "deb-systemd-helper enable egressd.service" in calls
    assert "systemctl --system daemon-reload" in calls
    assert "deb-systemd-invoke start egressd.service" in calls
    assert not [c for c in calls if " stop " in c]


def test_an_upgrade_restarts_the_agent_and_never_stops_it_alone(deb, tmp_path):
    """prerm leaves the old agent running; postinst restarts it (SIGTERM leaves every table in force, the
    new agent adopts them with zero writes: tests/integration/test_agent.py)."""
    calls, _ = _maintainer_script(tmp_path, deb, "prerm", "upgrade", "9.9.9")
    assert calls == []
    calls, _ = _maintainer_script(tmp_path, deb, "postinst", "configure", "0.0.1")
    assert "deb-systemd-invoke restart egressd.service" in calls
    assert not [c for c in calls if " stop " in c or " start " in c]


def test_remove_stops_and_purge_forgets_the_state(deb, tmp_path):
    calls, _ = _maintainer_script(tmp_path, deb, "prerm", "remove")
    assert calls == ["deb-systemd-invoke stop egressd.service"]
    calls, _ = _maintainer_script(tmp_path, deb, "postrm", "remove", state=True)
    assert "systemctl --system daemon-reload" in calls
    calls, out = _maintainer_script(tmp_path, deb, "postrm", "purge", state=True)
    assert out.split() == ["STATE-GONE"]
    if Path("/usr/bin/deb-systemd-helper").exists():
        assert "deb-systemd-helper purge egressd.service" in calls


def test_without_systemd_the_scripts_start_nothing(deb, tmp_path):
    calls, _ = _maintainer_script(tmp_path, deb, "postinst", "configure", systemd=False)
    assert not [c for c in calls if c.startswith(("systemctl", "deb-systemd-invoke"))], calls


def test_the_package_contents(deb, scratch):
    entries = contents(deb)
    assert all(owner == "root/root" for _mode, owner, _t in entries.values())
    assert entries["/usr/bin/egressd"] == ("lrwxrwxrwx", "root/root", "/opt/egressd/bin/egressd")
    assert entries["/opt/egressd/bin/python3"][2] == "/usr/bin/python3"  # the system interpreter
    assert entries["/opt/egressd/bin/egressd"][0] == "-rwxr-xr-x"
    assert entries["/usr/lib/systemd/system/egressd.service"][0] == "-rw-r--r--"  # merged-/usr
    assert entries["/etc/egressd/egressd.toml"][0] == "-rw-r--r--"
    assert entries["/var/lib/egressd"][0] == "drwx------"  # the unit's StateDirectoryMode
    assert "/usr/lib/tmpfiles.d/egressd.conf" in entries
    # the README and every page of the reference it links to
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert "/usr/share/doc/egressd/README.md" in entries
    assert (
        sorted(p.rsplit("/", 1)[1] for p in entries if p.startswith("/usr/share/doc/egressd/docs/")) == docs
    )
    assert f"/{SITE}/egressd/cli.py" in entries
    assert any(p.startswith(f"/{SITE}/pydantic_core/") and ".so" in p for p in entries)
    assert not [p for p in entries if p.startswith("/opt/egressd/bin/pip")]  # no pip: dpkg owns the venv
    assert not [p for p in entries if "/tests/" in p or p.endswith(".egg-link")]
    assert not [
        p
        for p in entries
        if not p.startswith(("/etc/egressd", "/opt", "/usr", "/var"))
        and p not in ("/", "/etc", "/var/lib", "/var")
    ]

    assert (scratch / "usr/lib/systemd/system/egressd.service").read_bytes() == (
        ROOT / "packaging/egressd.service"
    ).read_bytes()
    assert (scratch / "etc/egressd/egressd.toml").read_bytes() == (
        ROOT / "packaging/egressd.toml"
    ).read_bytes()
    assert "--system-site-packages /opt/egressd" in (scratch / "opt/egressd/pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in (scratch / "opt/egressd/pyvenv.cfg").read_text()
    assert (scratch / "opt/egressd/bin/egressd").read_text().startswith("#!/opt/egressd/bin/python\n")

    # Every dependency pyproject.toml pins at this moment is in the venv, at its pinned version.
    site = scratch / SITE
    for spec in PYPROJECT["project"]["dependencies"]:
        name, _, version = spec.partition("==")
        dist = re.sub(r"[-_.]+", "_", name.strip()).lower()
        assert list(site.glob(f"{dist}-{version.strip()}.dist-info")), spec
    assert (site / f"egressd-{VERSION}.dist-info").is_dir()
    assert not (
        site / f"egressd-{VERSION}.dist-info/direct_url.json"
    ).exists()  # non-editable, no source path

    # Nothing in the tree names the build directory (the venv was built at /opt/egressd itself).
    build = str(ROOT / "build").encode()
    leaks = [p for p in scratch.rglob("*") if p.is_file() and not p.is_symlink() and build in p.read_bytes()]
    assert leaks == []


def test_the_installed_agent_runs(scratch):
    out = run_installed(scratch, "/opt/egressd/bin/python", "-m", "egressd", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"egressd {VERSION}", out.stderr
    # /usr/bin/egressd as installed: an absolute symlink to /opt/egressd/bin/egressd.
    out = run_installed(scratch, str(scratch / "usr/bin/egressd"), "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"egressd {VERSION}", out.stderr

    code = "import egressd, nftables, pydantic; print(egressd.__file__, pydantic.__file__, nftables.__file__)"
    out = run_installed(scratch, "/opt/egressd/bin/python", "-c", code)
    assert out.returncode == 0, out.stderr
    ours, pyd, nft = out.stdout.split()
    assert ours == f"/{SITE}/egressd/__init__.py"
    assert pyd.startswith(f"/{SITE}/pydantic/")
    assert nft.startswith("/usr/lib/python3/dist-packages/nftables/")  # Debian's python3-nftables


def test_the_installed_egressd_validates_with_the_installed_config(scratch, tmp_path):
    config = str(scratch / "etc/egressd/egressd.toml")
    good = tmp_path / "good.ndjson"
    good.write_text(
        '{"type": "upsert", "sandbox": {"id": "sb-1", "network_policy": {"allow_out": ["198.51.100.0/24"]}}}\n'
        '{"type": "delete", "id": "sb-1"}\n'
    )
    out = run_installed(scratch, str(scratch / "usr/bin/egressd"), "validate", "--config", config, str(good))
    assert out.returncode == 0, out.stdout + out.stderr

    bad = tmp_path / "bad.ndjson"
    bad.write_text(
        '{"type": "upsert", "sandbox": {"id": "sb-1"}}\n'
        '{"type": "upsert", "sandbox": {"id": "sb-2", "network_policy": {"deny_out": ["999.1.1.1"]}}}\n'
    )
    out = run_installed(scratch, str(scratch / "usr/bin/egressd"), "validate", "--config", config, str(bad))
    assert out.returncode == 1
    assert f"{bad}:2: sandbox 'sb-2': network_policy.deny_out[0] '999.1.1.1'" in out.stdout + out.stderr
    assert f"{bad}:1:" not in out.stdout + out.stderr


def test_the_installed_egressd_writes_a_table(scratch, tmp_path, netns_name):
    """libnftables through Debian's python3-nftables, from the packaged venv: `egressd apply` for real."""
    record = tmp_path / "s0.json"
    record.write_text(
        f'{{"id": "s0", "netns": "/run/netns/{netns_name}", "network_policy": {{"allow_internet_access": false}}}}'
    )
    out = run_installed(scratch, str(scratch / "usr/bin/egressd"), "apply", str(record))
    assert out.returncode == 0, out.stdout + out.stderr
    assert nft_json(netns_name, "list", "table", "inet", "egressd")
