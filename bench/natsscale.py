"""NATS scale benchmark: one nats-server carrying H hosts, each watching its own keys in one KV bucket.

H simulated hosts in this one asyncio process, each with its own nats-py connection and its own KV watch on
`<host_id>.>` in the bucket `egressd-sandboxes`, made exactly as egressd's nats:// feed makes its session
(`nats.connect` with egressd's options, `js.key_value`, `js.stream_info`, `kv.watch`, the entries up to the
end-of-initial-values marker as the snapshot, then live updates), against one real nats-server with
JetStream on 127.0.0.1 (`tests/natsd.py`). Measured: loading K keys, the fleet's cold start, write-to-delivery
latency with H watchers against one watcher, and the whole fleet reconnecting at once, with and without
egressd's jitter. No agent and no namespaces: it needs no root. `python -m bench.natsscale [--smoke]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from bench.agent import proc_figures, quantiles, table
from bench.apply import Row, machine_info
from bench.figures import Figure
from egressd.common.backoff import Backoff
from egressd.feed.nats import PING_INTERVAL, REQUEST_TIMEOUT, WATCH_INACTIVE
from tests.loopback import free_port
from tests.natsd import NatsServer

BUCKET = "egressd-sandboxes"
STREAM = f"KV_{BUCKET}"
CONNECT_TIMEOUT_S = 2.0  # [feed.nats] connect_timeout's default
JS_TIMEOUT_S = max(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT)  # as egressd's session
RETRY_INITIAL_S, RETRY_MAX_S = 0.5, 30.0  # [feed.nats] retry_initial and retry_max defaults
CLOSE_TIMEOUT_S = 2.0  # egressd's CLOSE_TIMEOUT
LOAD_IN_FLIGHT = 256  # puts awaiting their JetStream ack at once while loading the bucket
WRITE_TIMEOUT_S = 10.0  # a write not delivered by then is counted lost
WRITE_GAP_S = 0.01  # between latency writes: the fleet idle, not a storm
PHASE_CAP_S = 240.0  # a cold start or herd not done by then is reported with the hosts still missing
CLEANUP_S = 30.0  # closing every connection at the end, whatever happened
LAG_TICK_S = 0.05
VALUE_BYTES = 600
DOC_CIDRS = (
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "203.0.113.7",
    "198.51.100.42",
    "192.0.2.128/25",
    "198.51.100.128/26",
    "203.0.113.64/27",
    "2001:db8::/48",
    "2001:db8:1::/64",
    "2001:db8:2::1",
    "2001:db8:abcd::/56",
    "2001:db8:ffff::/64",
    "2001:db8:10::/60",
)
ONE_WATCHER = "the same writes with 1 watcher (H=1), same server and bucket, first"
NO_JITTER = "the same reconnect without jitter: all H at once"


# --- the bucket's contents ----------------------------------------------------------------------------------


def host_id(i: int) -> str:
    return f"dp-{i:04d}"


def record(n: int, variant: int = 0) -> bytes:
    """A sandbox record of about VALUE_BYTES of JSON: documentation-range CIDRs, rotated by `variant` so that
    every write changes the value."""
    rot = variant % len(DOC_CIDRS)
    allow = list(DOC_CIDRS[rot:] + DOC_CIDRS[:rot])[:12]
    while True:
        doc = {
            "status": "running",
            "netns": f"/run/netns/sb-{n}",
            "host_interface": f"veth-{n % 100000}",
            "network_policy": {
                "allow_internet_access": False,
                "allow_out": allow,
                "deny_out": ["203.0.113.99", "2001:db8:dead::/48"],
            },
        }
        data = json.dumps(doc).encode()
        if len(data) >= VALUE_BYTES - 20:
            return data
        allow.append(f"198.51.100.{(n + variant + len(allow)) % 256}")


# --- one simulated host ------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """A session that came up: seconds per step, from just before nats.connect."""

    connect_s: float
    bucket_s: float  # js.key_value + js.stream_info, as egressd
    watch_s: float  # kv.watch: the ordered consumer made
    snapshot_s: float  # entries up to the end-of-initial-values marker
    total_s: float
    keys: int


@dataclass
class Done:
    """One host's way through a cold start or a herd."""

    host: str
    done_s: float  # from the phase's start until this host holds its snapshot
    attempts: int
    session: Attempt


class Host:
    """One dataplane host: its own connection and watch, the way egressd's NatsSource makes a session."""

    def __init__(self, index: int, url: str, fleet: Fleet) -> None:
        self.id = host_id(index)
        self.url = url
        self.fleet = fleet
        self.nc: Client | None = None
        self.reader: asyncio.Task[None] | None = None
        self.expect: dict[str, asyncio.Future[tuple[int, int]]] = {}
        self.closing = False
        self.updates = 0

    async def _error(self, e: Exception) -> None:
        self.fleet.client_errors[type(e).__name__] += 1
        self.fleet.last_errors.append(f"{self.id}: {type(e).__name__}: {e}")
        del self.fleet.last_errors[:-20]

    async def _lost(self) -> None:
        if not self.closing:
            self.fleet.lost_connections += 1

    async def session(self) -> Attempt:
        """Connect, find the bucket, watch `<host_id>.>`, read the snapshot; then follow in the background."""
        self.closing = False
        t0 = time.perf_counter()
        nc = await nats.connect(
            servers=[self.url],
            name=f"egressd {self.id}",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,  # type: ignore[arg-type]
            connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=2,
            error_cb=self._error,
            disconnected_cb=self._lost,
        )
        try:
            t1 = time.perf_counter()
            js = nc.jetstream(timeout=JS_TIMEOUT_S)
            kv = await js.key_value(BUCKET)
            await js.stream_info(STREAM)
            t2 = time.perf_counter()
            watcher = await kv.watch(f"{self.id}.>", inactive_threshold=WATCH_INACTIVE)
            t3 = time.perf_counter()
            keys = 0
            async for item in watcher:
                if item is None:
                    break
                keys += 1
            t4 = time.perf_counter()
        except BaseException:
            self.closing = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
            raise
        self.nc = nc
        self.reader = asyncio.create_task(self._follow(watcher), name=f"follow-{self.id}")
        return Attempt(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, keys)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for item in watcher:
            if item is None:
                continue
            t = time.perf_counter_ns()
            self.updates += 1
            fut = self.expect.get(item.key)
            if fut is not None and not fut.done():
                fut.set_result((int(item.revision or 0), t))

    async def join(self, t_phase: float, jitter: bool) -> Done:
        """Sessions until one holds its snapshot, retried with egressd's Backoff; with `jitter`, the first
        attempt waits one backoff delay too (uniform(0.25, 0.5) s), as egressd does after a lost session."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
        if jitter:
            await asyncio.sleep(backoff.next())
        attempts = 0
        while True:
            attempts += 1
            try:
                session = await self.session()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failed session is one more retry, as in egressd
                self.fleet.failed_sessions[type(e).__name__] += 1
                self.fleet.last_errors.append(f"{self.id} session: {type(e).__name__}: {e}")
                del self.fleet.last_errors[:-20]
                await asyncio.sleep(backoff.next())
                continue
            return Done(self.id, time.perf_counter() - t_phase, attempts, session)

    async def close(self) -> None:
        self.closing = True
        reader, self.reader = self.reader, None
        nc, self.nc = self.nc, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
        for fut in self.expect.values():
            fut.cancel()
        self.expect.clear()


@dataclass
class Fleet:
    hosts: list[Host] = field(default_factory=list)
    client_errors: Counter[str] = field(default_factory=Counter)
    failed_sessions: Counter[str] = field(default_factory=Counter)
    last_errors: list[str] = field(default_factory=list)
    lost_connections: int = 0

    async def close_all(self) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(h.close() for h in self.hosts), return_exceptions=True)
        return time.perf_counter() - t0


# --- what the server and this process cost --------------------------------------------------------------


class LagMonitor:
    """How late this process's event loop runs a 50 ms timer: all H hosts share one loop and 2 CPUs, so a
    late loop is this bench's bottleneck, not the server's."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.lags_ms.append(max(0.0, (time.perf_counter() - t - LAG_TICK_S) * 1000))

    def start(self) -> None:
        self.lags_ms = []
        self._task = asyncio.create_task(self._run(), name="lag-monitor")

    async def stop(self) -> dict[str, float | int | None]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        return quantiles(self.lags_ms)


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of `pid` (None: this process)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def monitor(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as r:
        return dict(json.loads(r.read()))


class Meter:
    """CPU seconds of the server and of this process over a phase, and the event loop's lag."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.lag = LagMonitor()
        self._t0 = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._t0 = (time.perf_counter(), cpu_s(self.server.pid), cpu_s())
        self.lag.start()

    async def stop(self) -> dict[str, Any]:
        wall, server0, own0 = self._t0
        lag = await self.lag.stop()
        return {
            "wall_s": time.perf_counter() - wall,
            "server_cpu_s": cpu_s(self.server.pid) - server0,
            "bench_cpu_s": cpu_s() - own0,
            "loop_lag_ms": lag,
        }


@dataclass
class Results:
    load: dict[str, Any] = field(default_factory=dict)
    cold: dict[str, Any] = field(default_factory=dict)
    latency_one: dict[str, Any] = field(default_factory=dict)
    latency_fleet: dict[str, Any] = field(default_factory=dict)
    herd: dict[str, Any] = field(default_factory=dict)
    herd_jitter: dict[str, Any] = field(default_factory=dict)
    server: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> RSS, connections, consumers
    phase: str = "setup"


class Bench:
    def __init__(self, args: argparse.Namespace, server: NatsServer, http_port: int, res: Results) -> None:
        self.args = args
        self.server = server
        self.http_port = http_port
        self.res = res
        self.fleet = Fleet()
        self.rng = random.Random(1)
        self.meter = Meter(server)
        self.pub: Client | None = None
        self.kv: KeyValue | None = None
        self.variant = 0

    async def look(self, stage: str) -> dict[str, Any]:
        """The server's own word (RSS, connections, consumers) at a stage of the run."""
        assert self.server.pid is not None and self.pub is not None
        view: dict[str, Any] = dict(proc_figures(self.server.pid))
        info = await self.pub.jetstream(timeout=JS_TIMEOUT_S).stream_info(STREAM)
        view["consumer_count"] = info.state.consumer_count
        view["messages"] = info.state.messages
        view["stream_bytes"] = info.state.bytes
        try:
            varz = await asyncio.to_thread(monitor, self.http_port, "varz")
            jsz = await asyncio.to_thread(monitor, self.http_port, "jsz")
        except (OSError, ValueError) as e:
            view["monitor_error"] = str(e)
        else:
            view.update(
                connections=varz.get("connections"),
                subscriptions=varz.get("subscriptions"),
                slow_consumers=varz.get("slow_consumers"),
                varz_mem=varz.get("mem"),
                jsz_consumers=jsz.get("consumers"),
                jsz_api_total=(jsz.get("api") or {}).get("total"),
                jsz_api_errors=(jsz.get("api") or {}).get("errors"),
            )
        self.res.server[stage] = view
        return view

    async def connect_publisher(self) -> None:
        async def quiet(e: Exception) -> None:
            self.fleet.client_errors[f"publisher {type(e).__name__}"] += 1

        self.pub = await nats.connect(servers=[self.server.url], name="bench control plane", error_cb=quiet)
        js = self.pub.jetstream(timeout=10.0)
        self.kv = await js.create_key_value(bucket=BUCKET, history=1)

    async def load(self) -> None:
        """K puts, LOAD_IN_FLIGHT of them awaiting their ack at any time."""
        self.res.phase = "load"
        assert self.kv is not None
        kv, kph = self.kv, self.args.keys_per_host
        items = [(f"{host_id(i)}.sb-{j}", i * kph + j) for i in range(self.args.hosts) for j in range(kph)]
        size = len(record(len(items)))
        next_item = 0

        async def worker() -> None:
            nonlocal next_item
            while next_item < len(items):
                key, n = items[next_item]
                next_item += 1
                await kv.put(key, record(n))

        self.meter.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(LOAD_IN_FLIGHT, len(items)))))
        took = time.perf_counter() - t0
        self.res.load = {
            "keys": len(items),
            "value_bytes": size,
            "in_flight": LOAD_IN_FLIGHT,
            "seconds": took,
            "puts_per_s": len(items) / took if took else None,
            "cost": await self.meter.stop(),
        }

    async def latency(self, hosts: Sequence[Host], out: dict[str, Any]) -> None:
        """W writes, each to a random key of a random host in `hosts`, one at a time: ms from just before
        kv.put until that host's watcher has the revision put returned."""
        assert self.kv is not None
        kph = self.args.keys_per_host
        delivered: list[float] = []
        acked: list[float] = []
        lost = wrong = 0
        out.update(watchers=len(hosts), writes=self.args.writes)
        self.meter.start()
        for _ in range(self.args.writes):
            host = self.rng.choice(hosts)
            j = self.rng.randrange(kph)
            key = f"{host.id}.sb-{j}"
            self.variant += 1
            value = record(int(host.id[3:]) * kph + j, self.variant)
            fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
            host.expect[key] = fut
            t0 = time.perf_counter_ns()
            try:
                revision = await self.kv.put(key, value)
                t_put = time.perf_counter_ns()
                got, t = await asyncio.wait_for(fut, WRITE_TIMEOUT_S)
            except TimeoutError:
                lost += 1
                continue
            finally:
                host.expect.pop(key, None)
            if got != revision:
                wrong += 1
            delivered.append((t - t0) / 1e6)
            acked.append((t_put - t0) / 1e6)
            out.update(delivered_ms=quantiles(delivered), lost=lost, wrong_revision=wrong)
            await asyncio.sleep(WRITE_GAP_S)
        out.update(
            delivered_ms=quantiles(delivered),
            put_acked_ms=quantiles(acked),
            lost=lost,
            wrong_revision=wrong,
            samples_ms=[round(v, 3) for v in delivered],
            cost=await self.meter.stop(),
        )

    async def join_all(self, out: dict[str, Any], jitter: bool) -> None:
        """Every host (re)connects and reads its snapshot at once; out: the last one's time and the spread."""
        out.update(hosts=len(self.fleet.hosts), jitter=jitter, done=0)
        failed0 = sum(self.fleet.failed_sessions.values())
        self.meter.start()
        t_phase = time.perf_counter()
        tasks = [asyncio.create_task(h.join(t_phase, jitter), name=f"join-{h.id}") for h in self.fleet.hosts]
        try:
            finished, pending = await asyncio.wait(tasks, timeout=PHASE_CAP_S)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        done = [t.result() for t in finished if not t.cancelled() and t.exception() is None]
        sessions = [d.session for d in done]
        out.update(
            done=len(done),
            missing=len(self.fleet.hosts) - len(done),
            all_s=max(d.done_s for d in done) if len(done) == len(self.fleet.hosts) else None,
            done_s=quantiles([d.done_s for d in done]),
            session_s=quantiles([s.total_s for s in sessions]),
            steps_s={
                step: quantiles([getattr(s, step) for s in sessions])
                for step in ("connect_s", "bucket_s", "watch_s", "snapshot_s")
            },
            attempts_max=max((d.attempts for d in done), default=None),
            hosts_retried=sum(d.attempts > 1 for d in done),
            failed_sessions=sum(self.fleet.failed_sessions.values()) - failed0,
            short_snapshots=sum(s.keys != self.args.keys_per_host for s in sessions),
            cost=await self.meter.stop(),
        )
        if pending:
            raise RuntimeError(
                f"{len(pending)} of {len(tasks)} hosts had no snapshot after {PHASE_CAP_S:g} s"
            )

    async def run(self) -> None:
        args, res = self.args, self.res
        res.phase = "publisher"
        await self.connect_publisher()
        await self.load()
        await self.look("loaded, no watchers")
        self.fleet.hosts = [Host(i, self.server.url, self.fleet) for i in range(args.hosts)]

        res.phase = "latency, 1 watcher"
        one = self.fleet.hosts[0]
        res.latency_one["session"] = asdict(await one.session())
        await self.latency([one], res.latency_one)
        await one.close()
        await self.look("after the 1-watcher baseline")

        res.phase = "cold start"
        await self.join_all(res.cold, jitter=False)
        await self.look(f"{args.hosts} watchers live")

        res.phase = f"latency, {args.hosts} watchers"
        await self.latency(self.fleet.hosts, res.latency_fleet)

        for out, jitter in ((res.herd, False), (res.herd_jitter, True)):
            res.phase = "herd" + (", jittered" if jitter else "")
            out["close_all_s"] = await self.fleet.close_all()
            await self.look(f"closed for the {'jittered ' if jitter else ''}herd")
            await self.join_all(out, jitter)
            await self.look(f"after the {'jittered ' if jitter else ''}herd")
        res.phase = "done"

    async def close(self) -> None:
        await self.fleet.close_all()
        if self.pub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pub.close(), CLOSE_TIMEOUT_S)


# --- stopping: deadline and signals -------------------------------------------------------------------------


class Stopper:
    """SIGTERM, SIGINT and the --seconds bound all cancel the run's main task, whose clean-up then closes
    every connection; outside the event loop a signal raises KeyboardInterrupt, so the server is stopped."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        reason = f"interrupted (signal {signum})"
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.stop, reason)
        else:
            raise KeyboardInterrupt(reason)

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self.task is not None and not self.task.done():
                self.task.cancel()


async def run_all(bench: Bench, stopper: Stopper, end: float) -> None:
    loop = asyncio.get_running_loop()
    stopper.loop, stopper.task = loop, asyncio.current_task()
    timer = loop.call_later(
        max(0.0, end - time.monotonic()), stopper.stop, f"--seconds {bench.args.seconds:g} exceeded"
    )
    try:
        await bench.run()
    except asyncio.CancelledError:
        if stopper.reason is None:
            raise
    finally:
        timer.cancel()
        stopper.task = None  # a second signal during the clean-up must not cancel it
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(bench.close(), CLEANUP_S)
        stopper.loop = None


# --- report ------------------------------------------------------------------------------------------------


def _mb(kib: float | None) -> float | None:
    return None if kib is None else kib * 1024 / 1e6


def rows_for(res: Results, args: argparse.Namespace) -> list[Row]:
    """egressd column: H hosts; baseline column: one watcher where there is one; ratio = 1 / H."""
    h = args.hosts
    rows: list[Row] = []
    load = res.load
    rows.append(Row(f"load: {load.get('keys', 0):,} puts, keys/s", load.get("puts_per_s"), None))
    rows.append(Row("  load: seconds", load.get("seconds"), None))
    cold = res.cold
    rows.append(Row(f"cold start: {h} hosts connect at once -> last snapshot, s", cold.get("all_s"), None))
    for q in ("p50", "p99", "max"):
        rows.append(Row(f"  per host connect + snapshot {q}, s", cold.get("session_s", {}).get(q), None))
    for step in ("connect_s", "bucket_s", "watch_s", "snapshot_s"):
        rows.append(
            Row(f"  per host {step[:-2]} p50, s", cold.get("steps_s", {}).get(step, {}).get("p50"), None)
        )
    rows.append(Row("  hosts that needed a retry", cold.get("hosts_retried"), None))
    rows.append(Row("  server CPU during it, s", cold.get("cost", {}).get("server_cpu_s"), None))
    rows.append(Row("  this process's CPU during it, s", cold.get("cost", {}).get("bench_cpu_s"), None))
    watch_s = res.latency_one.get("session", {}).get("watch_s")
    watch_ms = None if watch_s is None else watch_s * 1000
    rows.append(Row("1 watcher alone: kv.watch (consumer create), ms", watch_ms, None))
    fleet, one = res.latency_fleet.get("delivered_ms", {}), res.latency_one.get("delivered_ms", {})
    n_f, n_1 = fleet.get("n", 0), one.get("n", 0)
    for q in ("p50", "p99", "max"):
        rows.append(Row(f"put -> watcher has it ({n_f}/{n_1} writes), {h} vs 1 watchers, {q} ms",
                        fleet.get(q), one.get(q), True))  # fmt: skip
    rows.append(
        Row("  put acked p50 ms", res.latency_fleet.get("put_acked_ms", {}).get("p50"),
            res.latency_one.get("put_acked_ms", {}).get("p50"), True)
    )  # fmt: skip
    for label, herd in (("at once", res.herd), ("jittered 0.25-0.5 s", res.herd_jitter)):
        rows.append(Row(f"herd ({label}): {h} reconnect -> last snapshot, s", herd.get("all_s"), None))
        rows.append(Row("  per host done p50, s", herd.get("done_s", {}).get("p50"), None))
        rows.append(Row("  per host connect + snapshot p99, s", herd.get("session_s", {}).get("p99"), None))
        rows.append(Row("  hosts that needed a retry", herd.get("hosts_retried"), None))
    before = res.server.get("loaded, no watchers", {})
    live = res.server.get(f"{h} watchers live", {})
    rows.append(Row("server RSS, no watchers, MB", _mb(before.get("vmrss_kib")), None))
    rows.append(Row(f"server RSS, {h} watchers live, MB", _mb(live.get("vmrss_kib")), None))
    per = per_consumer_kib({"settings": {"hosts": h}, "server": res.server})
    rows.append(Row("  server RSS per consumer made, KiB", per, None))
    rows.append(Row(f"server connections with {h} live (varz)", live.get("connections"), None))
    rows.append(Row("  consumer_count (stream_info)", live.get("consumer_count"), None))
    last = res.server.get("after the jittered herd", {})
    rows.append(Row("  consumer_count after both herds", last.get("consumer_count"), None))
    return rows


def per_consumer_kib(results: dict[str, Any]) -> float | None:
    """Server RSS per consumer: from the 1-watcher baseline's end (the stream's per-subject index is loaded by
    then, and that one consumer lingers) to H watchers live, over the consumers made meanwhile, orphans of
    timed-out creates included."""
    hosts = results.get("settings", {}).get("hosts")
    server = results.get("server", {})
    one = server.get("after the 1-watcher baseline", {})
    live = server.get(f"{hosts} watchers live", {})
    if None in (
        one.get("vmrss_kib"),
        live.get("vmrss_kib"),
        one.get("consumer_count"),
        live.get("consumer_count"),
    ):
        return None
    made = live["consumer_count"] - one["consumer_count"]
    return float(live["vmrss_kib"] - one["vmrss_kib"]) / made if made > 0 else None


def to_json(
    args: argparse.Namespace,
    info: dict[str, Any],
    res: Results,
    bench: Bench | None,
    rows: Sequence[Row],
    wall: float,
    aborted: str | None,
    errors: Sequence[str],
) -> dict[str, Any]:
    fleet = bench.fleet if bench is not None else Fleet()
    doc = {
        "machine": info,
        "settings": {
            "hosts": args.hosts,
            "keys_per_host": args.keys_per_host,
            "writes": args.writes,
            "seconds": args.seconds,
            "smoke": args.smoke,
            "bucket": BUCKET,
            "connect_timeout_s": CONNECT_TIMEOUT_S,
            "js_timeout_s": JS_TIMEOUT_S,
            "retry_initial_s": RETRY_INITIAL_S,
            "retry_max_s": RETRY_MAX_S,
            "ping_interval_s": PING_INTERVAL,
            "write_gap_s": WRITE_GAP_S,
        },
        "wall_seconds": wall,
        "aborted": aborted,
        "errors": list(errors),
        "phase_reached": res.phase,
        "load": res.load,
        "latency": {"one": res.latency_one, "fleet": res.latency_fleet},
        "cold_start": res.cold,
        "herd": {"at_once": res.herd, "jittered": res.herd_jitter},
        "server": res.server,
        "server_per_consumer_kib": None,
        "client": {
            "errors": dict(fleet.client_errors),
            "failed_sessions": dict(fleet.failed_sessions),
            "lost_connections": fleet.lost_connections,
            "last_errors": fleet.last_errors,
        },
        "table": [asdict(r) for r in rows],
    }
    doc["server_per_consumer_kib"] = per_consumer_kib(doc)
    return doc


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: the fleet's cold start, write -> delivery
    with H watchers against one, the reconnect herd with egressd's jitter against none, and the server's
    memory and consumers. No goals: these sit next to NATS' published figures in docs/fleet.md."""
    settings = results.get("settings", {})
    h, kph = settings.get("hosts", 0), settings.get("keys_per_host", 0)
    load = results.get("load", {})
    cold = results.get("cold_start", {})
    lat = results.get("latency", {})
    fleet, one = lat.get("fleet", {}).get("delivered_ms", {}), lat.get("one", {}).get("delivered_ms", {})
    herd = results.get("herd", {})
    at_once, jittered = herd.get("at_once", {}), herd.get("jittered", {})
    server = results.get("server", {})
    live = server.get(f"{h} watchers live", {})
    before = server.get("loaded, no watchers", {})
    per = results.get("server_per_consumer_kib")
    figures = [
        Figure("natsscale", f"load {load.get('keys', 0):,} keys, puts/s", "puts/s", load.get("puts_per_s"),
               lower_is_better=False,
               note=f"{LOAD_IN_FLIGHT} puts in flight, ~{load.get('value_bytes', '?')} B values"),
        Figure("natsscale", f"cold start, {h:,} hosts x {kph} keys -> last snapshot", "s", cold.get("all_s"),
               note=f"per host p50 {_n(cold.get('session_s', {}).get('p50'))} s, "
               f"p99 {_n(cold.get('session_s', {}).get('p99'))} s; retried {cold.get('hosts_retried', '?')}"
               + (f"; {cold['missing']} hosts had no snapshot after {PHASE_CAP_S:g} s"
                  if cold.get("missing") else "")),
    ]  # fmt: skip
    watch_s = lat.get("one", {}).get("session", {}).get("watch_s")
    figures.append(
        Figure("natsscale", f"kv.watch alone (consumer create), {load.get('keys', 0):,} keys", "ms",
               None if watch_s is None else watch_s * 1000,
               note="one host, nothing else running; the server makes consumers one at a time")
    )  # fmt: skip
    for q in ("p50", "p99"):
        figures.append(
            Figure("natsscale", f"put -> delivered, {h:,} watchers live, {q}", "ms", fleet.get(q), one.get(q),
                   ONE_WATCHER, note=f"{fleet.get('n', 0)} writes; max {_n(fleet.get('max'))} ms")
        )  # fmt: skip
    figures.append(
        Figure("natsscale", f"herd: {h:,} hosts reconnect, jittered -> last snapshot", "s",
               jittered.get("all_s"), at_once.get("all_s"), NO_JITTER,
               note="jitter uniform(0.25, 0.5) s included; retried "
               f"{jittered.get('hosts_retried', '?')} (at once: {at_once.get('hosts_retried', '?')})")
    )  # fmt: skip
    figures.append(
        Figure("natsscale", f"server RSS, {h:,} watchers live", "MB", _mb(live.get("vmrss_kib")),
               note=f"{_n(_mb(before.get('vmrss_kib')))} MB with the keys and no watchers; "
               f"{_n(per)} KiB per consumer")
    )  # fmt: skip
    figures.append(
        Figure("natsscale", f"server consumers, {h:,} watchers live", "consumers", live.get("consumer_count"),
               note=f"{live.get('connections', '?')} connections; after both herds "
               f"{server.get('after the jittered herd', {}).get('consumer_count', '?')} consumers")
    )  # fmt: skip
    return figures


def _n(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.natsscale", description=__doc__.splitlines()[0])
    p.add_argument(
        "--hosts", type=int, default=1000, metavar="H", help="simulated hosts, one connection each (1000)"
    )
    p.add_argument("--keys-per-host", type=int, default=100, metavar="K", help="sandboxes per host (100)")
    p.add_argument(
        "--writes", type=int, default=500, metavar="W", help="latency writes, H and 1 watchers (500)"
    )
    p.add_argument(
        "--seconds", "--max-seconds", dest="seconds", type=float, default=600.0,
        help="abort cleanly after this (default 600; --max-seconds is the suite's name for it)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every figure and machine info here")
    p.add_argument("--smoke", action="store_true", help="H=20, K=5, W=20: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.hosts, args.keys_per_host, args.writes = 20, 5, 20
    if min(args.hosts, args.keys_per_host, args.writes) < 1 or args.seconds <= 0:
        p.error("counts and --seconds must be positive")
    if args.hosts > 10000:
        p.error("--hosts: at most 10,000 (host ids dp-0000..dp-9999)")
    return args


def raise_fd_limit() -> str | None:
    """One descriptor per host in this process and in the server (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return f"raised RLIMIT_NOFILE soft limit from {soft} to {hard}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed; 1 when a phase failed; 2 when it could not run or was aborted."""
    args = parse_args(argv)
    stopper = Stopper()
    signal.signal(signal.SIGTERM, stopper.handler)
    signal.signal(signal.SIGINT, stopper.handler)
    started = time.monotonic()
    end = started + args.seconds
    note = raise_fd_limit()
    info = machine_info()
    res = Results()
    bench: Bench | None = None
    aborted: str | None = None
    errors: list[str] = []
    server: NatsServer | None = None
    work = Path(tempfile.mkdtemp(prefix="egressd-bench-natsscale-"))
    try:
        http_port = free_port()
        server = NatsServer(work / "nats", config=f'http: "127.0.0.1:{http_port}"\n')
        server.start()
        info["nats_py"] = importlib.metadata.version("nats-py")
        info["nats_server"] = monitor(http_port, "varz").get("version")
        bench = Bench(args, server, http_port, res)
        asyncio.run(run_all(bench, stopper, end))
        aborted = stopper.reason
    except KeyboardInterrupt as e:
        aborted = stopper.reason or f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError, TimeoutError, nats.errors.Error) as e:
        errors.append(f"{res.phase}: {type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            if server is not None:
                server.stop()
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - started

    rows = rows_for(res, args)
    print(
        f"NATS scale benchmark: {args.hosts} simulated hosts (own connection and KV watch on "
        f"<host_id>.> each, one asyncio process) x {args.keys_per_host} keys, one nats-server "
        f"{info.get('nats_server', '?')} with JetStream on 127.0.0.1; baseline column = the same writes "
        f"with 1 watcher"
    )
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, Python {info['python']}, nats-py "
        f"{info.get('nats_py', '?')}" + (f"; {note}" if note else "")
    )
    print()
    print(table(rows))
    print()
    for stage, view in res.server.items():
        print(
            f"server {stage}: RSS {_n(_mb(view.get('vmrss_kib')))} MB, {view.get('connections', '?')} "
            f"connections, {view.get('consumer_count')} consumers, {view.get('fds')} fds"
        )
    fleet = bench.fleet if bench is not None else Fleet()
    if fleet.failed_sessions or fleet.client_errors or fleet.lost_connections:
        print(
            f"client: failed sessions {dict(fleet.failed_sessions)}, errors {dict(fleet.client_errors)}, "
            f"connections lost {fleet.lost_connections}; last: {fleet.last_errors[-3:]}"
        )
    status = f"ABORTED: {aborted}" if aborted else (f"{len(errors)} FAILED" if errors else "complete")
    for e in errors:
        print(f"FAILED {e}")
    print(f"wall time {wall:.1f} s ({status}; phase reached: {res.phase})")
    if args.json:
        doc = to_json(args, info, res, bench, rows, wall, aborted, errors)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
