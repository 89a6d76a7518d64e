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
