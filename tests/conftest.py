import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens", action="store_true", help="rewrite tests/golden/*.json from the renderer"
    )


@pytest.fixture
def update_goldens(request):
    return request.config.getoption("--update-goldens")


def pytest_collection_modifyitems(config, items):
    """Root tests need real namespaces; outside CI, skip them for non-root users, inside CI never skip."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI=true but not running as root: the real-kernel tests would be skipped")
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
