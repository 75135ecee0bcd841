"""Test set-up: without CUDA, Triton kernels run through the interpreter; `gpu` tests skip cleanly.

This folder goes on sys.path, so every test imports the shared helpers as `helpers` (tests/helpers.py)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import helpers  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("thorough", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output (attention out / lse, the vertical-slash index) starts as garbage (NaN, or -7 for
    ints): an element a kernel forgets to write fails the comparison. Use with
    `pytestmark = pytest.mark.usefixtures("poisoned_outputs")` (works with hypothesis' @given tests)."""
    helpers.poison_kernel_outputs(monkeypatch)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
