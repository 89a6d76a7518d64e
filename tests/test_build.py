"""The compiled module, the version guard and `python -m hybridpar_ext info`."""

import json
import subprocess
import sys

import pytest
import torch

import hybridpar_ext
from hybridpar_ext import _build


def test_build_info_describes_this_build():
    info = hybridpar_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
        assert all(arch >= 80 for arch in info["cuda_arch_list"])
    else:
        assert info["cuda_version"] is None and info["cuda_arch_list"] == []


def test_import_refuses_an_extension_built_for_another_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch .* but torch 1\.0\.0 is imported"):
        _build.load_extension()


def test_kernels_ship_inside_the_package():
    pytest.importorskip("triton")
    import hybridpar_ext.kernels.norm as norm
    assert callable(norm.norm_fwd) and callable(norm.norm_bwd)


def test_info_command_reports_build_and_ops(tmp_path):
    # Run outside the checkout, so `-m` finds the installed package, not the source tree.
    out = subprocess.run([sys.executable, "-m", "hybridpar_ext", "info", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    report = json.loads(out)
    assert report["torch"] == torch.__version__
    assert report["hybridpar_ext._C"]["torch_version"] == torch.__version__
    assert set(report["ops"]) >= {"layer_norm", "rms_norm"}
    assert report["ops"]["layer_norm"]["cpu"] in ("reference", "triton (interpreter)")


def test_backend_variable_is_checked(monkeypatch):
    from hybridpar_ext.ops import _backend
    monkeypatch.setenv("HYBRIDPAR_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="HYBRIDPAR_BACKEND must be one of"):
        _backend.requested()
    monkeypatch.setenv("HYBRIDPAR_BACKEND", "reference")
    assert not _backend.use_triton(torch.empty(1))


def test_an_interpreter_that_cannot_run_the_kernels_is_named():
    from hybridpar_ext.ops._backend import interpreter_problem

    problem = interpreter_problem("3.6.0", "2.4.6")
    assert "triton 3.6.0" in problem and "numpy 2.4.6" in problem and "triton >= 3.7 or numpy < 2.4" in problem
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0+git1a2b", "2.5.2"),
                                          ("3.3.1", "1.26.4")):
        assert interpreter_problem(triton_version, numpy_version) is None, (triton_version, numpy_version)
