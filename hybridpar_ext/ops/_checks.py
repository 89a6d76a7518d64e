"""Argument checks shared by the public ops: each error names the op, the argument and
what was expected, and is raised before any kernel or collective starts."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {t.dtype}")


def check_optional(op: str, name: str, t, shape, device: torch.device):
    """An optional tensor argument: None, or a float tensor of `shape` on `device`."""
    if t is None:
        return
    check_tensor(op, name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check_same_device(op, name, t, device)


def check_same_device(op: str, name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, but x is on {device}; "
                         "all tensors must be on one device")


def check_positive(op: str, name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: {name} must be a positive number, got {value!r}")
