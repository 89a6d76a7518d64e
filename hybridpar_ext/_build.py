"""Loads the compiled module ``hybridpar_ext._C`` and checks it matches this torch.

An extension compiled against one torch and imported with another fails in obscure ways
(undefined symbols at best, a crash at worst), so the mismatch is reported up front.
"""

import importlib

import torch

REBUILD_HINT = ("rebuild it against the torch you are using: "
                "pip install --no-build-isolation --force-reinstall --no-deps .")


def load_extension():
    try:
        module = importlib.import_module("hybridpar_ext._C")
    except ImportError as err:
        raise ImportError(
            f"hybridpar_ext._C could not be loaded ({err}). It is built by "
            f"`pip install --no-build-isolation .`; if it was built, it was probably built "
            f"against another torch than {torch.__version__}: {REBUILD_HINT}") from err
    built_with = module.build_info()["torch_version"]
    if built_with != torch.__version__:
        raise ImportError(
            f"hybridpar_ext._C was built against torch {built_with}, but torch "
            f"{torch.__version__} is imported; {REBUILD_HINT}")
    return module


def build_info() -> dict:
    """How `_C` was built (CUDA or not, arch list, CUDA/NCCL and torch versions)."""
    from . import _C
    return dict(_C.build_info())
