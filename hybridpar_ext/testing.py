"""Helpers for tests: tolerances by dtype against the float64 reference, and running a
function on several ranks of a real process group."""

import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

import torch

# Relative to the largest magnitude of the expected tensor: about two units in the last
# place of each dtype, so an error of a few roundings passes and a wrong formula fails.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype=None, name="",
                              scale=None):
    """`actual` (computed in `dtype`) against `expected` (computed in float64).

    Elementwise ``|a - e| <= tol * (|e| + scale)``: relative error where values are large,
    and an absolute floor where they pass near zero. ``scale`` defaults to ``max|e|``; a
    result that is a small difference of large terms (a norm's input gradient, say) passes
    the size of those terms instead, since rounding them in `dtype` is unavoidable.
    """
    dtype = dtype or actual.dtype
    tol = TOLERANCE[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), scale or 0.0, 1e-30)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name} ({dtype}): {m}")


# ------------------------------------------------------------------ one-process references

class ReferenceRun(NamedTuple):
    losses: list          # the loss of every step, as floats
    grads: dict           # every gradient of the first step, by name (tied weights under each name)
    grad_norms: list      # with clip_grad, the global gradient norm of every step before clipping


def train_reference(model: torch.nn.Module, batches, lr: float, weight_decay: float = 0.0,
                    clip_grad: Optional[float] = None, loss_fn=None) -> ReferenceRun:
    """Train ``model`` in this one process on whole batches with torch.optim.AdamW: the
    oracle the parallel trainers are compared with.

    ``batches`` holds one token tensor of ``[batch, seq + 1]`` per step: the inputs are its
    first ``seq`` columns, the targets its last ``seq``. ``loss_fn(model, inputs, targets)``
    defaults to ``model(inputs, targets)`` (our GPT returns its loss). With ``clip_grad``
    the gradients are clipped by their global norm (torch.nn.utils.clip_grad_norm_) before
    each update, and the first step's gradients are recorded after clipping.
    """
    loss_fn = loss_fn or (lambda m, inputs, targets: m(inputs, targets))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses, grads, norms = [], None, []
    for tokens in batches:
        opt.zero_grad()
        loss = loss_fn(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if clip_grad is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad).item())
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(loss.item())
    return ReferenceRun(losses, grads, norms)


def assert_matches_reference(label: str, losses, grads: dict, reference: ReferenceRun) -> None:
    """A parallel run against :func:`train_reference`'s: every step's loss and every first-step
    gradient (the same names, each elementwise) within float32 tolerance."""
    for step, (got, expected) in enumerate(zip(losses, reference.losses), 1):
        assert_close_to_reference(torch.tensor(got), torch.tensor(expected, dtype=torch.float64), torch.float32,
                                  f"[{label}] loss of step {step}")
    assert set(grads) == set(reference.grads), f"[{label}] {sorted(set(grads) ^ set(reference.grads))}"
    for name, g in reference.grads.items():
        assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] grad {name}")


def causal_lm_loss(model, inputs, targets):
    """A Hugging Face causal LM's mean cross-entropy on `inputs` against `targets` (a
    ``loss_fn`` for :func:`train_reference`): what the parallel stages compute, without the
    label shifting that ``labels=`` would do."""
    logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------ distributed tests

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, timeout: float = 120.0, backend: str = "gloo",
              env: Optional[dict] = None, **kwargs) -> list:
    """Run ``fn(rank, world_size, **kwargs)`` in ``world_size`` fresh processes joined in a
    process group, and return what each rank returned (JSON-able values), by rank.

    ``fn`` is a module-level function of a file that can be imported on its own (a test
    file, say); each process loads that file by path, so nothing needs to be picklable or
    installed. Every process gets ``OMP_NUM_THREADS=1`` unless ``env`` says otherwise. If a
    rank fails, the others are stopped and the error carries every rank's output; if the
    ranks are not all done after ``timeout`` seconds, all are killed and the error says so —
    a test built on this fails, it never hangs.
    """
    path, name = os.path.abspath(inspect.getsourcefile(fn)), fn.__name__
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
                HYBRIDPAR_RANKS_BACKEND=backend, HYBRIDPAR_RANKS_TIMEOUT=str(timeout))
    base.update(env or {})
    args = [sys.executable, "-m", "hybridpar_ext.testing", path, name, json.dumps(kwargs)]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+") for r in range(world_size)]
        # Started outside the source tree, so they import the installed hybridpar_ext.
        procs = [subprocess.Popen(args, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), cwd=tmp,
                                  stdout=logs[r], stderr=subprocess.STDOUT)
                 for r in range(world_size)]
        deadline = time.monotonic() + timeout
        failed = timed_out = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(p.returncode not in (None, 0) for p in procs):
                failed = True
                time.sleep(2.0)  # let the others report their side before they are stopped
                break
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    if timed_out or failed or any(p.returncode != 0 for p in procs):
        why = f"timed out after {timeout:.0f} s" if timed_out else "failed"
        report = "\n".join(f"----- rank {r} (exit {p.returncode}) -----\n{out[-6000:]}"
                           for r, (p, out) in enumerate(zip(procs, outputs)))
        raise AssertionError(f"{name} on {world_size} ranks {why}:\n{report}")
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
        results.append(json.loads(lines[-1][len(_RESULT):]) if lines else None)
    return results


_RESULT = "HYBRIDPAR_RANK_RESULT "


def _rank_main(path: str, name: str, kwargs_json: str):
    import datetime
    import gc
    import importlib.util

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location(f"_hybridpar_ranks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = float(os.environ.get("HYBRIDPAR_RANKS_TIMEOUT", "120"))
    backend = os.environ["HYBRIDPAR_RANKS_BACKEND"]
    if backend == "nccl":
        import torch
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = getattr(module, name)(rank, world, **json.loads(kwargs_json))
    finally:
        gc.collect()  # objects holding the process group go before the group does
        dist.destroy_process_group()
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
    # Not through interpreter finalization, where a gloo thread still letting go of the last
    # collective aborts the process (see parallel/shutdown.py).
    from hybridpar_ext.parallel.shutdown import exit_process
    exit_process(0)
