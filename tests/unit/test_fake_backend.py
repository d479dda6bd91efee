"""The fake backend behaves like the real one where callers can tell: copies, fingerprints, errors."""

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.fake import FakeBackend
from egressd.kernel.netns import NetnsError
from egressd.model.config import Config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render


def ruleset(**np):
    return render(parse_sandbox({"id": "a", "network_policy": np}).policy, Config())


def test_apply_read_fingerprint_remove():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    rs = ruleset(deny_out=["1.1.1.1"])
    assert fb.fingerprint("/run/netns/a") is None
    fb.apply("/run/netns/a", rs)
    assert fb.fingerprint("/run/netns/a") == rs.fingerprint
    rs.variant.clear()  # copy-on-apply: the caller's objects are not the stored table
    assert fb.read("/run/netns/a")
    assert fb.remove("/run/netns/a") is True and fb.remove("/run/netns/a") is False
    assert fb.writes == [("apply", "/run/netns/a"), ("remove", "/run/netns/a"), ("remove", "/run/netns/a")]


def test_missing_namespace_is_reported_as_gone():
    with pytest.raises(NetnsError) as e:
        FakeBackend().apply("/run/netns/nope", ruleset())
    assert e.value.gone


def test_injected_failure_leaves_old_table():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    old = ruleset()
    fb.apply("/run/netns/a", old)
    fb.fail = lambda ns, op: ApplyError("injected") if op == "apply" else None
    with pytest.raises(ApplyError):
        fb.apply("/run/netns/a", ruleset(allow_internet_access=False))
    assert fb.fingerprint("/run/netns/a") == old.fingerprint
