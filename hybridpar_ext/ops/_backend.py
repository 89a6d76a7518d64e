"""The one place that decides which implementation runs for a tensor.

``HYBRIDPAR_BACKEND``:
- ``auto`` (default): Triton for CUDA tensors when Triton imports, else the reference;
- ``reference``: the pure-PyTorch fallback everywhere (debugging, A/B checks);
- ``triton``: Triton wherever it can run, CPU tensors included when
  ``TRITON_INTERPRET=1`` was set before the kernels were imported (this is how the
  tests exercise the kernels on a machine without a GPU).
"""

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def requested() -> str:
    name = os.environ.get("HYBRIDPAR_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"HYBRIDPAR_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_version():
    """Triton's version, or None when it does not import."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.lru_cache(maxsize=None)
def kernels(name: str):
    """The module ``hybridpar_ext.kernels.<name>``, imported on first use."""
    return importlib.import_module(f"hybridpar_ext.kernels.{name}")


def _major_minor(version: str):
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def interpreter_problem(triton_version: str, numpy_version: str):
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    Before triton 3.7 the interpreter turns a loop bound computed inside a kernel (``for start
    in range(lo, hi, BLOCK)``) into an int with ``int()`` on a one-element numpy array, which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); 3.7
    squeezes the array first. Checked: triton 3.6.0 fails with numpy 2.4.6 and passes with
    2.3.5; 3.7.0 and newer pass with 2.4.6."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton's interpreter in triton {triton_version} cannot run these kernels with numpy "
                f"{numpy_version}: it needs triton >= 3.7 or numpy < 2.4 (pip install 'numpy<2.4')")
    return None


@functools.lru_cache(maxsize=None)
def _installed_interpreter_problem():
    import numpy
    return interpreter_problem(triton_version(), numpy.__version__)


def triton_can_run(device: torch.device) -> bool:
    if triton_version() is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def use_triton(t: torch.Tensor, dtypes=TRITON_DTYPES) -> bool:
    """True when the Triton kernels should run for tensor ``t``; ``dtypes``: those the
    op's kernels take (the norms' also take float64)."""
    return use_triton_for(t.device, t.dtype, dtypes)


def use_triton_for(device: torch.device, dtype: torch.dtype, dtypes=TRITON_DTYPES) -> bool:
    if dtype not in dtypes:
        return False
    choice = requested()
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_can_run(device):
            raise RuntimeError(
                f"HYBRIDPAR_BACKEND=triton, but Triton cannot run on {device} here "
                f"(triton {triton_version() or 'not installed'}, "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
        if device.type == "cpu" and _installed_interpreter_problem():
            raise RuntimeError(f"HYBRIDPAR_BACKEND=triton on the CPU: {_installed_interpreter_problem()}")
        return True
    return device.type == "cuda" and triton_can_run(device)


def describe(device: str, dtype: torch.dtype = torch.float32) -> str:
    """What runs for a tensor on `device`, in words (for `info`)."""
    device = torch.device(device)
    try:
        if use_triton_for(device, dtype):
            return "triton (interpreter)" if device.type == "cpu" else "triton"
    except RuntimeError as err:
        return f"error: {err}"
    return "reference"
