import logging

import pytest


class _Bugs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        if record.getMessage() in ("reconcile_bug", "feed_handler_failed"):
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_swallowed_bugs(request):
    """Workers survive bugs by logging them; a test must not pass because a bug was swallowed."""
    if request.node.get_closest_marker("swallows_bugs"):
        yield
        return
    handler = _Bugs()
    logger = logging.getLogger("egressd")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() + ": " + str(r.exc_info) for r in handler.records]
