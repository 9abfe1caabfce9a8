import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

TRACES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "traces"))


@pytest.fixture
def traces_dir():
    if not os.path.isdir(TRACES):
        pytest.skip(f"shared traces folder {TRACES} absent (read-only data, not in the repo)")
    return TRACES
