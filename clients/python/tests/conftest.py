import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # qosroute_client, without installing it
sys.path.insert(0, str(HERE))

import gateway  # noqa: E402


@pytest.fixture(scope="session")
def site():
    """The real broker, emulated experts and the real qosrouted, shared by the tests."""
    missing = gateway.missing_binaries()
    if missing:
        pytest.skip("binaries missing: " + "; ".join(missing))
    s = gateway.Site()
    yield s
    s.stop()
