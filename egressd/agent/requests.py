"""What the control socket answers: `status`, `dns`, `wait`, `explain` and `denials` requests, each a JSON
document in and one out. Every field of a request is checked; a bad one gets an error that says what was
expected."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import Any

from egressd.agent.control import Streamed
from egressd.agent.denials import DenialBook
from egressd.desired.dnscache import RDTYPES, Answer, join_errors
from egressd.desired.resolve import DnsService, resolve_all
from egressd.model.config import Config
from egressd.reconcile.reconciler import Reconciler
from egressd.ruleset.decide import IPAddress
from egressd.ruleset.explain import explain_addresses, parse_dest
from egressd.ruleset.names import judge_name


class ControlApi:
    """The handler behind agent/control.py's server. agent_info: the agent's own part of `status`."""

    def __init__(
        self,
        reconciler: Reconciler,
        dns: DnsService,
        config: Callable[[], Config],
        agent_info: Callable[[], dict[str, Any]],
        denials: DenialBook | None = None,
    ) -> None:
        self._reconciler = reconciler
        self._dns = dns
        self._config = config
        self._agent_info = agent_info
        self._denials = denials

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            sid = req.get("id")
            if sid is not None:
                return self._one(sid)
            return {"agent": self._agent_info(), "sandboxes": Streamed(self._rows())}
        if cmd == "dns":
            cache = self._dns.cache
            proxy = self._reconciler.proxy
            learned = {sid: proxy.view(sid, limit=200) for sid in sorted(proxy.sandboxes)}
            names = Streamed(cache.view(n) for n in sorted(cache.names))
            return {"names": names, "dns": self.dns_info(), "learned": learned}
        if cmd == "wait":
            return await self.wait(req)
        if cmd == "explain":
            return await self.explain(req)
        if cmd == "denials":
            return await self.denials(req)
        return {"error": f"unknown command {cmd!r}; expected status, dns, wait, explain or denials"}

    def _one(self, sid: Any) -> dict[str, Any]:
        """`status SANDBOX`: its row, and its last few denials."""
        row = next(iter(self._reconciler.report(sid)), None) if isinstance(sid, str) else None
        if row is None:
            return {"error": f"no sandbox {sid!r} is known to the agent; `egressd status` lists them"}
        row["dns_proxy"] = self._reconciler.proxy.view(sid)
        recent = self._denials.recent(sid) if self._denials is not None else None  # None: not logged
        return {"agent": self._agent_info(), "sandboxes": [row], "denials": recent}

    async def denials(self, req: dict[str, Any]) -> dict[str, Any]:
        """The kept denial events, of one sandbox or all: newer than `since` seconds, after the event
        `after`; with `wait`, a long poll: the answer comes once there is one (`denials --follow`)."""
        sid, since, after, wait = req.get("id"), req.get("since"), req.get("after", 0), req.get("wait", 0)
        if sid is not None and not isinstance(sid, str):
            return {"error": '"id" must be a sandbox id (string), or absent for every sandbox'}
        if since is not None and (not isinstance(since, int | float) or not 0 <= since <= 7 * 86400):
            return {"error": '"since" must be a number of seconds between 0 and 604800'}
        if (
            not isinstance(after, int)
            or after < 0
            or not isinstance(wait, int | float)
            or not 0 <= wait <= 60
        ):
            return {"error": '"after" must be an event number (>= 0), "wait" seconds between 0 and 60'}
        if self._denials is None:
            return {
                "error": "denials are not logged on this agent: set [denials] log = true (docs/denials.md)"
            }
        if sid is not None and self._reconciler.desired.get(sid) is None:
            return {"error": f"no sandbox {sid!r} is known to the agent; `egressd status` lists them"}
        book = self._denials
        last = book.last_seq
        events = await book.wait_after(sid, after, float(wait)) if wait else book.events(sid, since, after)
        last = max([last, *(e.seq for e in events)])
        return {"events": Streamed(e.doc() for e in events), "last": last}

    def _rows(self) -> Iterator[dict[str, Any]]:
        for row in self._reconciler.report():
            row["dns_proxy"] = self._reconciler.proxy.view(row["id"])
            yield row

    async def wait(self, req: dict[str, Any]) -> dict[str, Any]:
        sid, revision, timeout = req.get("id"), req.get("revision"), req.get("timeout", 30)
        if not isinstance(sid, str) or not (revision is None or isinstance(revision, int)):
            return {"error": 'wait needs "id" (string) and optional "revision" (integer)'}
        if not isinstance(timeout, int | float) or not 0 <= timeout <= 3600:
            return {"error": '"timeout" must be a number of seconds between 0 and 3600'}
        ok = await self._reconciler.wait_enforced(sid, revision, float(timeout))
        return {"ok": ok, "sandbox": next(iter(self._reconciler.report(sid)), None)}

    def dns_info(self) -> dict[str, Any]:
        return {
            "names": len(self._dns.cache.names),
            "queries": self._dns.queries,
            "failures": self._dns.failures,
            "nameservers": list(self._config().dns_nameservers) or "resolv.conf",
        }

    async def _resolve(self, dest: str, name: str) -> tuple[list[IPAddress], dict[str, str], str | None]:
        """(addresses, why a record type gave none, an error when no type gave any): each record type on
        its own, as the agent resolves, so one type failing never hides the other's answer."""
        try:
            answers = await asyncio.wait_for(
                resolve_all(self._dns.resolver, name), self._config().dns_timeout + 1
            )
        except TimeoutError:
            answers = {t: Answer("error", error="timeout: no answer from the nameservers") for t in RDTYPES}
        addrs = sorted(
            {ip_address(a) for ans in answers.values() for a in ans.addresses},
            key=lambda a: (a.version, int(a)),
        )
        unresolved = {t: ans.error for t, ans in answers.items() if ans.kind == "error" and ans.error}
        if addrs:
            return addrs, unresolved, None
        why = join_errors({t: ans.error or f"no {t} records" for t, ans in answers.items()})
        return [], unresolved, f"destination {dest!r}: cannot resolve it: {why}; give an address instead"

    async def explain(self, req: dict[str, Any]) -> dict[str, Any]:
        """The verdict for one destination of one sandbox, from its desired state and the DNS cache: what
        the kernel is given. A host name is resolved once with the agent's own resolver."""
        sid, dest = req.get("id"), req.get("dest")
        if not isinstance(sid, str) or not isinstance(dest, str):
            return {"error": 'explain needs "id" (string) and "dest" (an address or host name)'}
        d = self._reconciler.desired.get(sid)
        if d is None:
            return {"error": f"no sandbox {sid!r} is known to the agent; `egressd status` lists them"}
        try:
            target = parse_dest(dest)
        except ValueError as e:
            return {"error": f"destination {dest!r}: {e}"}
        unresolved: dict[str, str] = {}
        if isinstance(target, str):
            addrs, unresolved, error = await self._resolve(dest, target)
            if error is not None:
                return {"error": error}
        else:
            addrs = [target]
        st = self._reconciler.status.get(sid)
        proxy = self._reconciler.proxy
        out = explain_addresses(
            d.policy, self._reconciler.config, self._dns.cache, addrs, lambda a: proxy.learned(sid, a)
        )
        if isinstance(target, str) and proxy.view(sid) is not None:
            out["notes"].append(f"{target}: the sandbox's own DNS query gets {judge_name(d.policy, target)}")
        return {
            "sandbox": sid,
            "dest": dest,
            "hostname": target if isinstance(target, str) else None,
            "revision": d.revision,
            "state": st.state if st is not None else "pending",
            # not "error": on the control socket that key means the request failed
            "problem": d.problem or (st.error if st is not None else "not reconciled yet"),
            "unresolved": unresolved,  # record type -> why it gave no addresses just now
            **out,
        }
