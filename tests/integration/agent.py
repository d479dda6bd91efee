"""Run the real agent (`egressd run`) as a subprocess for integration tests, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from egressd.agent.control import ControlError, request


class AgentProcess:
    """One `egressd run` with its own config, state dir, control socket, feed file and log file."""

    def __init__(
        self,
        workdir: Path,
        *,
        resync_interval: float = 30.0,
        extra_config: str = "",
        feed: str = "",
        env: dict[str, str] | None = None,
        netns: str | None = None,
        wrap: list[str] | None = None,
        feed_config: str = "",
    ) -> None:
        self.env = env or {}
        self.netns = netns  # run the agent inside this namespace (a test world's "host"), not the machine's
        self.wrap = wrap or []  # a command prefix, e.g. nsenter into a private mount namespace
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.feed_path = self.dir / "events.ndjson"
        self.feed_path.touch()
        self.socket = str(self.dir / "control.sock")
        self.log_path = self.dir / "agent.log"
        self.config_path = self.dir / "egressd.toml"
        feed = feed or f"file:{self.feed_path}"
        if "[metrics]" not in extra_config:
            # Test agents run side by side: none takes the default metrics port unless a test asks.
            extra_config += '[metrics]\nlisten = ""\n'
        self.config_path.write_text(
            f'[feed]\nsource = "{feed}"\n{feed_config}[state]\ndir = "{self.dir / "state"}"\n'
            f'[control]\nsocket = "{self.socket}"\n[reconcile]\nresync_interval = {resync_interval}\n'
            f"retry_initial = 0.05\nretry_max = 0.5\n{extra_config}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, stdin: int = subprocess.DEVNULL) -> AgentProcess:
        readies = len(self.events("ready")) if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        prefix = [*self.wrap, *(["ip", "netns", "exec", self.netns] if self.netns else [])]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "egressd", "run", "--config", str(self.config_path)],
            stdin=stdin,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        log.close()
        if wait_ready:
            self.wait_log("ready", timeout=15, count=readies + 1)
        return self

    def send(self, *events: dict[str, Any] | str) -> None:
        with open(self.feed_path, "a") as f:
            for e in events:
                f.write((e if isinstance(e, str) else json.dumps(e)) + "\n")

    def upsert(self, sid: str, netns: str, revision: int | None = None, **policy: Any) -> None:
        self.send(
            {
                "type": "upsert",
                "sandbox": {"id": sid, "netns": netns, "revision": revision, "network_policy": policy},
            }
        )

    def status(self) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in request(self.socket, {"cmd": "status"})["sandboxes"]}

    def agent_status(self) -> dict[str, Any]:
        return request(self.socket, {"cmd": "status"})["agent"]

    def wait(self, sid: str, revision: int | None = None, timeout: float = 10.0) -> bool:
        answer = request(
            self.socket, {"cmd": "wait", "id": sid, "revision": revision, "timeout": timeout}, timeout + 5
        )
        return bool(answer["ok"])

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "egressd", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "unparsed", "text": line})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def wait_log(
        self, name: str, timeout: float = 10.0, count: int = 1, **fields: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {name} {fields} within {timeout} s:\n{self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def running(self) -> bool:
        try:
            request(self.socket, {"cmd": "status"}, timeout=1)
        except ControlError:
            return False
        return True
