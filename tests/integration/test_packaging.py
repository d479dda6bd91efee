"""packaging/: the systemd unit and the example config.

The unit is checked three ways: systemd's own analyzer, its directives read back from the file, and the
hardening it relies on tried for real (the capability set, no_new_privs and MemoryDenyWriteExecute around
`egressd apply`; the whole unit under `systemd-run`, with systemd as PID 1: this machine's, or a container's
booted with systemd-nspawn from this machine's own root file system).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from egressd.agent.daemon import READY_TIMEOUT
from egressd.model.config import Config, load_config
from egressd.model.config_file import ConfigFile
from tests.integration.conftest import nft_json, nft_table

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "egressd.service"
EXAMPLE = ROOT / "packaging" / "egressd.toml"
EGRESSD = Path(sys.executable).with_name("egressd")
CAPS = {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
# setpriv(1) restricted the way the unit restricts the agent: bounding set of the unit's two capabilities,
# no_new_privs. Root's exec then holds exactly those two.
RESTRICTED = ["setpriv", "--bounding-set=-all,+net_admin,+sys_admin", "--no-new-privs", "--"]
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key to the list of its values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, str]:
    """The [Service] section, one value per key (asserting no key is given twice)."""
    sec = parse_unit(UNIT.read_text())["Service"]
    for key, values in sec.items():
        assert len(values) == 1, f"{key} is set {len(values)} times"
    return {k: v[0] for k, v in sec.items()}


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "").isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


def _systemd_is_pid1() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _systemd_in(pid: int) -> int | None:
    """The systemd process among pid's descendants (the container's PID 1), if it has started."""
    todo = _children(pid)
    while todo:
        p = todo.pop()
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "systemd":
                return p
        except OSError:
            continue
        todo += _children(p)
    return None


class SystemdHost:
    """Where `systemd-run` works: this machine when systemd is its PID 1; else a container booted with
    systemd-nspawn from this machine's own root file system, read-only (--volatile=state: /var is a tmpfs),
    with systemd as its PID 1, the checkout (and its .venv) and /run/netns bound in. The machine is not
    booted by systemd here (its PID 1 is the sandbox's own init), which is why the container is needed."""

    def __init__(self, tmp: Path) -> None:
        self.prefix: list[str] = []
        self.root = Path("/")
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._mnt = tmp / "host-root"
        self._mounted = False
        if _systemd_is_pid1():
            return
        if shutil.which("systemd-nspawn") is None:
            pytest.fail(
                "systemd is not PID 1 here and systemd-nspawn is missing (apt package systemd-container)"
            )
        self._mnt.mkdir()
        subprocess.run(["mount", "--bind", "/", str(self._mnt)], check=True)
        self._mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self._mnt)], check=True)
        Path("/run/netns").mkdir(exist_ok=True)
        argv = [
            "systemd-nspawn",
            "-D",
            str(self._mnt),
            "--volatile=state",
            "-M",
            f"egressd-unit-{os.getpid()}",
        ]
        argv += ["-b", "--register=no", "--keep-unit", "--console=read-only", "--capability=all"]
        argv += [f"--bind={ROOT}", "--bind=/run/netns"]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        self._nspawn = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            leader = _systemd_in(self._nspawn.pid)
            if leader is not None:
                self.prefix = ["nsenter", "-t", str(leader), "-a"]
                self.root = Path(f"/proc/{leader}/root")
                state = self.run("systemctl", "is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self._nspawn.poll() is not None:
                break
            time.sleep(0.5)
        self.close()
        pytest.fail("a container with systemd as PID 1 did not boot within 90 s (systemd-nspawn)")

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=timeout)

    def path(self, inside: str) -> str:
        """A path inside the systemd host, as this process reaches it."""
        return str(self.root / inside.lstrip("/"))

    def close(self) -> None:
        if self._nspawn is not None:
            self._nspawn.terminate()  # nspawn halts the container: systemd stops every unit
            try:
                self._nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait(10)
            self._nspawn = None
        if self._mounted:  # not Path.is_mount(): a bind of / is on the same device as its parent
            subprocess.run(["umount", str(self._mnt)], check=False)
            self._mounted = False


needs_analyzer = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt package systemd)"
)


@needs_analyzer
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts the unit with no complaint about it.

    verify also checks that ExecStart's binary exists, and /usr/bin/egressd only does once egressd is
    installed. So the unit verified is a copy whose ExecStart names this checkout's egressd (the venv's
    console script), everything else byte for byte the same; the shipped file's only possible complaint is
    then that missing binary, which is checked too.
    """
    text = UNIT.read_text()
    assert "\nExecStart=/usr/bin/egressd run --config /etc/egressd/egressd.toml\n" in text
    assert EGRESSD.exists()
    copy = tmp_path / "egressd.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/egressd ", f"ExecStart={EGRESSD} "))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if "egressd" in ln]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr

    shipped = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    complaints = [ln for ln in (shipped.stdout + shipped.stderr).splitlines() if "egressd" in ln]
    if Path("/usr/bin/egressd").exists():
        assert shipped.returncode == 0 and not complaints, shipped.stderr
    else:
        assert complaints == [
            "egressd.service: Command /usr/bin/egressd is not executable: No such file or directory"
        ]


@needs_analyzer
def test_setns_is_allowed_by_the_system_call_filter():
    """The agent calls setns(2); @system-service must hold it (through @process) or the filter kills it."""
    sec = service()
    assert sec["SystemCallFilter"] == "@system-service"
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@system-service", "@process"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    groups: dict[str, set[str]] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("@"):
            name = line.split()[0]
            groups[name] = set()
        elif name and line.strip() and not line.strip().startswith("#"):
            groups[name].add(line.split()[0])
    assert "@process" in groups["@system-service"]
    assert "setns" in groups["@process"]


def test_the_unit_directives():
    sec = service()
    assert sec["Type"] == "notify" and sec["NotifyAccess"] == "main"
    assert sec["ExecStart"] == "/usr/bin/egressd run --config /etc/egressd/egressd.toml"
    assert sec["ExecReload"] == "/bin/kill -HUP $MAINPID"  # the agent reloads its config on SIGHUP
    assert sec["Restart"] == "on-failure" and seconds(sec["RestartSec"]) > 0
    # The agent pings at half the interval. systemd must wait longer than the agent's own start-up caps:
    # READY_TIMEOUT for a file feed's backlog, then READY_TIMEOUT for the first reconcile.
    assert 2 <= seconds(sec["WatchdogSec"]) <= 120
    assert seconds(sec["TimeoutStartSec"]) > 2 * READY_TIMEOUT
    assert sec["KillMode"] == "mixed" and sec["KillSignal"] == "SIGTERM"
    soft, _, hard = sec["LimitNOFILE"].partition(":")
    assert int(hard or soft) >= 65536  # one netlink socket per watched sandbox

    # Exactly the two capabilities, nothing gained later.
    assert set(sec["CapabilityBoundingSet"].split()) == CAPS
    assert set(sec["AmbientCapabilities"].split()) == CAPS
    assert sec["NoNewPrivileges"] == "yes"

    # Writable: the state and runtime directories only; the config defaults live there.
    assert sec["ProtectSystem"] == "strict"
    assert sec["StateDirectory"] == "egressd" and sec["StateDirectoryMode"] == "0700"
    assert sec["RuntimeDirectory"] == "egressd"
    defaults = Config()
    assert defaults.state_dir == "/var/lib/" + sec["StateDirectory"]
    assert Path(defaults.control_socket).parent == Path("/run", sec["RuntimeDirectory"])
    assert defaults.feed_source.startswith("unix:")
    assert Path(defaults.feed_source.removeprefix("unix:")).parent == Path("/run", sec["RuntimeDirectory"])

    for key in (
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert sec[key] == "yes", key
    assert sec["RestrictNamespaces"] == "net"  # setns(fd, CLONE_NEWNET) is all the agent does
    assert set(sec["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    assert sec["SystemCallArchitectures"] == "native"

    # Nothing that would hide the sandboxes' namespaces or break setns into them or the host-side tables.
    for key in (
        "PrivateNetwork",
        "PrivateUsers",
        "ProtectProc",
        "ProcSubset",
        "PrivateMounts",
        "DynamicUser",
    ):
        assert key not in sec, key
    assert "User" not in sec  # root, bounded to the two capabilities


def test_the_example_config_loads_and_is_the_defaults():
    """packaging/egressd.toml sets every key egressd knows to its default: loading it changes nothing."""
    assert load_config(EXAMPLE) == Config() == load_config(None)
    data = tomllib.loads(EXAMPLE.read_text())
    fields = ConfigFile.model_fields
    assert set(data) == set(fields)
    for section, value in data.items():
        assert set(value) == set(fields[section].annotation.model_fields), section


def _mdwe_exec(argv: list[str]) -> list[str]:
    """argv run with prctl(PR_SET_MDWE): what MemoryDenyWriteExecute= does on kernels that have it."""
    code = (
        "import ctypes, os, sys\n"
        f"assert ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [sys.executable, "-c", code, *argv]


def _kernel_has_mdwe() -> bool:
    """PR_GET_MDWE answers (Linux 6.3 and later) instead of failing with EINVAL."""
    code = f"import ctypes; print(ctypes.CDLL(None).prctl({PR_SET_MDWE + 1}, 0, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() not in ("", "-1")


@pytest.mark.root
def test_egressd_works_with_the_units_capabilities_and_memory_deny_write_execute(netns_name, tmp_path):
    """`egressd apply` (libnftables through ctypes, setns) as root bounded to the unit's two capabilities,
    with no_new_privs and, where the kernel has it, PR_SET_MDWE: the kernel's form of
    MemoryDenyWriteExecute= (systemd 252 uses a seccomp filter with the same rule: no W+X mappings)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing (apt package util-linux)")
    record = {
        "id": "s0",
        "netns": f"/run/netns/{netns_name}",
        "network_policy": {"allow_internet_access": False},
    }
    path = tmp_path / "s0.json"
    path.write_text(json.dumps(record))
    argv = [*RESTRICTED, str(EGRESSD), "apply", str(path)]
    if _kernel_has_mdwe():
        argv = [*RESTRICTED, *_mdwe_exec([str(EGRESSD), "apply", str(path)])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert nft_json(netns_name, "list", "table", "inet", "egressd")


@pytest.mark.root
def test_which_namespace_paths_the_units_capabilities_can_open(netns_name):
    """What the unit's comment on capabilities says: /run/netns/NAME and /proc/PID/ns/net of a process with
    fewer capabilities open; /proc/PID/ns/net of a fully privileged root process does not (the ptrace access
    check wants the caller's permitted set to cover the target's, or CAP_SYS_PTRACE)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing (apt package util-linux)")
    full = subprocess.Popen(["sleep", "60"])
    bare = subprocess.Popen(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", "sleep", "60"])
    try:
        time.sleep(0.2)
        code = (
            "import os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        os.close(os.open(p, os.O_RDONLY)); print('ok')\n"
            "    except PermissionError:\n"
            "        print('denied')\n"
        )
        paths = [f"/run/netns/{netns_name}", f"/proc/{bare.pid}/ns/net", f"/proc/{full.pid}/ns/net"]
        out = subprocess.run(
            [*RESTRICTED, sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=30
        )
        assert out.stdout.split() == ["ok", "ok", "denied"], out.stderr
    finally:
        for p in (full, bare):
            p.kill()
            p.wait()


@pytest.mark.root
def test_the_agent_runs_as_the_hardened_unit(netns_name, tmp_path):
    """The agent under systemd-run with every [Service] property of the unit (Type=notify, watchdog,
    capabilities, ProtectSystem=strict, filters) and its own state and runtime directories, under a real
    systemd as PID 1: it gets ready, enforces a sandbox from its unix feed, reports STATUS=, and stops cleanly
    leaving the table."""
    host = SystemdHost(tmp_path)
    unit = f"egressd-test-{os.getpid()}"
    skip = {"ExecStart", "ExecReload", "StateDirectory", "RuntimeDirectory", "Restart", "RestartSec"}
    props = [f"{k}={v}" for k, v in service().items() if k not in skip]
    props += [f"StateDirectory={unit}", f"RuntimeDirectory={unit}"]
    # A checkout under /tmp or /home: PrivateTmp and ProtectHome would hide the agent's own code.
    props += [f"BindReadOnlyPaths={ROOT}"]
    feed, control = f"/run/{unit}/feed.sock", f"/run/{unit}/control.sock"
    cmd = ["systemd-run", f"--unit={unit}", "--quiet", "--collect"]
    cmd += [f"--property={p}" for p in props]
    cmd += [str(EGRESSD), "run", "--feed", f"unix:{feed}", "--state-dir", f"/var/lib/{unit}"]
    cmd += ["--control-socket", control]
    try:
        out = host.run(*cmd, timeout=2 * READY_TIMEOUT + 60)
        assert out.returncode == 0, out.stderr  # returns once the agent sent READY=1
        show = host.run("systemctl", "show", unit, "-p", "ActiveState", "-p", "StatusText").stdout
        assert "ActiveState=active" in show and "enforced" in show, show
        assert host.run("systemctl", "show", unit, "-p", "Type").stdout.strip() == "Type=notify"

        assert nft_table(netns_name) is None  # nothing before the record arrives
        event = {
            "type": "upsert",
            "sandbox": {"id": "s0", "netns": f"/run/netns/{netns_name}", "revision": 1},
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(host.path(feed))
            s.sendall(json.dumps(event).encode() + b"\n")
            wait = subprocess.run(
                [
                    str(EGRESSD),
                    "wait",
                    "s0",
                    "--revision",
                    "1",
                    "--timeout",
                    "20",
                    "--socket",
                    host.path(control),
                ],
                capture_output=True,
                text=True,
            )
        assert wait.returncode == 0, wait.stderr
        assert nft_table(netns_name)

        stop = host.run("systemctl", "stop", unit)
        assert stop.returncode == 0, stop.stderr
        assert nft_table(netns_name)  # tables outlive the agent
    finally:
        host.run("systemctl", "stop", unit)
        host.run("systemctl", "reset-failed", unit)
        shutil.rmtree(host.path(f"/var/lib/{unit}"), ignore_errors=True)
        host.close()
