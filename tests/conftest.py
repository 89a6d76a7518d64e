import os

import pytest
import torch

# Triton reads this when a kernel is decorated, so it must be set before hybridpar_ext
# imports any kernel. Without a GPU, the kernels run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Runs the test once through the reference path and once through the Triton kernels."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDPAR_BACKEND", request.param)
    return request.param


def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true",
                     help="only the tests that run on CUDA: those taking the `device` fixture and those "
                          "marked gpu (make gpu-check; an error without a CUDA device)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    if not torch.cuda.is_available():
        raise pytest.UsageError("--gpu-only: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    on_gpu = [item for item in items if "device" in getattr(item, "fixturenames", ())
              or item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=[item for item in items if item not in on_gpu])
    items[:] = on_gpu
