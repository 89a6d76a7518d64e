"""The trainer: its configuration errors (the same message on every rank, before any
collective), and the CLI end to end under torchrun (launching itself, the metrics file,
--plan)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hybridpar_ext.testing import run_ranks

BAD = [
    (["--hidden", "96", "--heads", "6", "--tp", "4"],
     "heads (6) must be divisible by the tensor-parallel size (4)"),
    (["--layers", "2", "--pp", "4"], "layers (2) must be at least the number of pipeline stages (4)"),
    (["--tp", "4", "--sp", "--seq", "30"], "seq (30) must be divisible by the tensor-parallel size (4)"),
    (["--pp", "4", "--microbatches", "2"],
     "microbatches (2) must be at least the number of pipeline stages (4)"),
    (["--dp", "2"], "dp * tp * pp = 2 * 1 * 1 = 2 processes, but the world size is 4"),
    (["--dp", "4", "--global-batch", "6"], "global batch (6) must be divisible by dp * microbatches = 4 * 1 = 4"),
    (["--tp", "4", "--ffn", "258"], "ffn (258) must be divisible by the tensor-parallel size (4)"),
]


def check_messages(rank, world):
    from hybridpar_ext.train import check_args, parse_args

    messages = []
    for flags, _ in BAD:
        try:
            check_args(parse_args(flags), world)
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_wrong_configurations_give_the_same_message_on_every_rank():
    results = run_ranks(check_messages, 4, timeout=120)
    for i, (flags, expected) in enumerate(BAD):
        assert all(r[i] is not None and expected in r[i] for r in results), (flags, [r[i] for r in results])
        assert len({r[i] for r in results}) == 1


def _launcher(args):
    """The trainer's command line, and an environment that is not torchrun's (so it launches)."""
    return ([sys.executable, "-m", "hybridpar_ext", "train", *args],
            {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})


def _cli(args, timeout, tmp_path):
    cmd, env = _launcher(args)
    # Outside the source tree, so the installed package is what runs.
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("flags,message", [
    (["--tp", "2", "--hidden", "96", "--heads", "3"], "heads (3) must be divisible by the tensor-parallel size (2)"),
    (["--nproc-per-node", "2", "--dp", "2", "--tp", "2"],
     "dp * tp * pp = 2 * 2 * 1 = 4 processes, but the world size is 2"),
    (["--dp", "2", "--data", "no-such-file.txt"], "--data: no such file 'no-such-file.txt'"),
], ids=["heads", "world", "data"])
def test_launcher_refuses_a_bad_configuration_before_torchrun(tmp_path, flags, message):
    """One message and exit status 2 from the launching process: no copy per rank, no torchrun."""
    out = _cli(flags + ["--steps", "1"], 120, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr[-3000:]
    assert "ChildFailedError" not in out.stdout + out.stderr and "[rank" not in out.stdout + out.stderr


def test_ranks_launched_by_hand_check_the_configuration_too(tmp_path):
    """Under a torchrun started by hand the ranks refuse, each with the same message (torchrun
    stops the others when the first exits, so not every rank may get to print; that every rank
    reaches the same verdict is test_wrong_configurations_give_the_same_message_on_every_rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hybridpar_ext", "train", "--dp", "2", "--tp", "2", "--steps", "1"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=_launcher([])[1])
    assert out.returncode != 0
    said = [line.split("] ", 1)[1] for line in out.stderr.splitlines() if line.startswith("[rank ")]
    assert said and set(said) == {"error: dp * tp * pp = 2 * 2 * 1 = 4 processes, but the world size is 2"}, \
        out.stderr[-3000:]


def test_cli_trains_with_the_planner_and_writes_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = _cli(["--plan", "--nproc-per-node", "2", "--layers", "2", "--hidden", "64", "--heads", "4",
                "--seq", "16", "--global-batch", "4", "--steps", "3", "--metrics-file", str(metrics)],
               240, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "chosen by --plan" in out.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "tokens_per_s", "step_time_s", "bubble", "layout"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert "done: 3 steps" in out.stdout


def _workers(launcher_pid):
    """{rank: pid} of the torchrun workers below the launcher, found through /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    workers, todo = {}, [launcher_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            except OSError:
                continue
            if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
                workers[int(env[b"RANK"])] = pid
    return workers


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_cli_ends_the_job_when_a_rank_dies_or_stalls(tmp_path, fault):
    """dp2 x tp2 training; rank 1 is killed, or stopped (a hang: its sockets stay open). The
    others must fail, the stalled case after --timeout, not the 30 minutes c10d would wait."""
    timeout = 8
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "launcher.log"
    args = ["--dp", "2", "--tp", "2", "--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "16",
            "--global-batch", "4", "--steps", "1000000", "--timeout", str(timeout), "--quiet",
            "--metrics-file", str(metrics)]
    cmd, env = _launcher(args)
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        _wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 180,
                    "two training steps")
        workers = _workers(launcher.pid)
        assert sorted(workers) == [0, 1, 2, 3], workers
        faulted = time.monotonic()
        if fault == "killed":
            os.kill(workers[1], signal.SIGKILL)
        else:
            os.kill(workers[1], signal.SIGSTOP)
            _wait_until(lambda: not _running(workers[0]), 4 * timeout, "rank 0 to give up on rank 1")
            assert time.monotonic() - faulted >= timeout * 0.9
            # So that torchrun's SIGTERM reaches it, instead of its SIGKILL 30 s later.
            os.kill(workers[1], signal.SIGCONT)
        returncode = launcher.wait(timeout=4 * timeout + 30)
        elapsed = time.monotonic() - faulted
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text()
    assert returncode != 0, output[-3000:]
    assert elapsed < 4 * timeout + 30
    if fault == "stalled":
        assert f"Timed out waiting {timeout * 1000}ms" in output, output[-3000:]


def test_cli_rejects_plan_with_a_layout():
    from hybridpar_ext.train import check_args, parse_args

    with pytest.raises(ValueError, match="--plan chooses the layout; drop --tp"):
        check_args(parse_args(["--plan", "--tp", "2"]), 2)


def _metrics(path, losses, layout="dp1 tp1 pp1"):
    path.write_text("".join(json.dumps({"step": i + 1, "loss": v, "layout": layout}) + "\n"
                            for i, v in enumerate(losses)))
    return str(path)


def test_compare_runs_verdict(tmp_path, capsys):
    from hybridpar_ext.train import compare_runs

    ref = _metrics(tmp_path / "ref.jsonl", [5.0, 4.0, 3.0, 2.5])
    noise = _metrics(tmp_path / "noise.jsonl", [5.0, 4.0, 3.0, 2.5 * (1 + 1e-3)])
    drifted = _metrics(tmp_path / "drift.jsonl", [5.0, 4.0, 3.0, 2.5 * (1 + 1.5e-3)], "dp2 tp1 pp1")
    assert compare_runs(drifted, ref, noise, exact_steps=3) == 0
    assert "verdict: MATCH" in capsys.readouterr().out
    # Beyond twice the drift of rounding alone.
    far = _metrics(tmp_path / "far.jsonl", [5.0, 4.0, 3.0, 2.5 * (1 + 3e-3)])
    assert compare_runs(far, ref, noise, exact_steps=3) == 1
    # A difference in the first steps is a bug, whatever the drift later.
    early = _metrics(tmp_path / "early.jsonl", [5.0, 4.001, 3.0, 2.5])
    assert compare_runs(early, ref, noise, exact_steps=3) == 1
    assert "verdict: MISMATCH" in capsys.readouterr().out


def test_launcher_passes_torchrun_its_flags(monkeypatch):
    from hybridpar_ext import train

    calls = []
    monkeypatch.setattr(train.launcher.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    for var in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    argv = ["train", "--dp", "2", "--tp", "2", "--pp", "2", "--nnodes", "2", "--node-rank", "1",
            "--rdzv-endpoint", "head:29400"]
    assert train.main(train.parse_args(argv[1:]), argv) == 0
    cmd, env = calls[0]
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1:i + 3] == ["--nproc-per-node", "4"]   # 8 processes over 2 nodes
    assert cmd[cmd.index("--node-rank") + 1] == "1" and cmd[cmd.index("--rdzv-endpoint") + 1] == "head:29400"
    assert cmd[cmd.index("-m", i) + 1:] == ["hybridpar_ext", *argv]
    assert env["OMP_NUM_THREADS"] == "1"
    calls.clear()
    argv = ["train", "--dp", "3", "--global-batch", "6"]
    assert train.main(train.parse_args(argv[1:]), argv) == 0
    assert "--standalone" in calls[0][0] and calls[0][0][calls[0][0].index("--nproc-per-node") + 1] == "3"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cli_trains_on_a_gpu_with_nccl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = _cli(["--layers", "2", "--hidden", "256", "--heads", "4", "--seq", "256", "--global-batch", "8",
                "--steps", "4", "--metrics-file", str(metrics)], 300, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nccl, bfloat16" in out.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["memory_gib"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
