"""The device mesh of a hybrid-parallel job: data x pipeline x tensor parallel.

Tensor parallelism is innermost (neighbouring ranks, the fastest links: one node's
NVLink), then pipeline, then data parallelism: rank = (dp_index * pp + pp_index) * tp + tp_index.
"""

import datetime
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelMesh:
    mesh: DeviceMesh
    dp: int
    pp: int
    tp: int

    @property
    def tp_group(self):
        return self.mesh.get_group("tp")

    @property
    def pp_group(self):
        return self.mesh.get_group("pp")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")


def _size(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"init_mesh: {name} must be a positive int or None, got {value!r}")
    return value


def _world_timeout() -> Optional[datetime.timedelta]:
    world = dist.group.WORLD
    for device in world._device_types:
        options = getattr(world._get_backend(device), "options", None)
        timeout = getattr(options, "_timeout", None)
        if timeout is not None:
            return timeout
    return None


def init_mesh(dp: Optional[int] = None, tp: Optional[int] = None, pp: Optional[int] = None,
              device_type: Optional[str] = None,
              timeout: Union[float, datetime.timedelta, None] = None) -> ParallelMesh:
    """A (dp, pp, tp) DeviceMesh over the initialised world. At most one size may be None:
    it is inferred from the world size. Raises, on every rank alike, if ``dp * tp * pp`` is not
    the world size.

    ``timeout`` (seconds or a timedelta) bounds every collective on the mesh's groups; by
    default it is the one given to ``init_process_group``.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_mesh: torch.distributed is not initialized (run under torchrun, or "
                           "call dist.init_process_group first)")
    world = dist.get_world_size()
    sizes = {"dp": _size("dp", dp), "tp": _size("tp", tp), "pp": _size("pp", pp)}
    unknown = [k for k, v in sizes.items() if v is None]
    if len(unknown) > 1:
        for k in unknown[1:]:
            sizes[k] = 1
        unknown = unknown[:1]
    if unknown:
        known = 1
        for k, v in sizes.items():
            if v is not None:
                known *= v
        if world % known:
            raise ValueError(f"init_mesh: world size {world} is not divisible by "
                             + " * ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
                             + f" = {known}, so {unknown[0]} cannot be inferred")
        sizes[unknown[0]] = world // known
    if sizes["dp"] * sizes["tp"] * sizes["pp"] != world:
        raise ValueError(f"init_mesh: dp={sizes['dp']} * tp={sizes['tp']} * pp={sizes['pp']} = "
                         f"{sizes['dp'] * sizes['tp'] * sizes['pp']}, but the world size is {world}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = datetime.timedelta(seconds=timeout)
    if timeout is not None and not (isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0):
        raise ValueError(f"init_mesh: timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    mesh = init_device_mesh(device_type, (sizes["dp"], sizes["pp"], sizes["tp"]),
                            mesh_dim_names=("dp", "pp", "tp"))
    # A DeviceMesh makes its subgroups with c10d's default timeout (30 min on gloo, 10 on NCCL),
    # not the world's: without this, a rank that hangs stalls its TP or PP peers for that long.
    timeout = timeout or _world_timeout()
    if timeout is not None:
        for name in ("dp", "pp", "tp"):
            mesh.get_group(name).set_timeout(timeout)
    return ParallelMesh(mesh, sizes["dp"], sizes["pp"], sizes["tp"])
