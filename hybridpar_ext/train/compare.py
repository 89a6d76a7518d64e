"""``python -m hybridpar_ext compare-runs``: do two trainings' metrics files have the same losses?"""

import json
from pathlib import Path


def _losses(path: str) -> dict:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def _max_relative_gap(a: dict, b: dict, steps) -> tuple:
    gaps = {s: abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in steps}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def compare_runs(path_a: str, path_b: str, noise: str = None, exact_steps: int = 5, rtol: float = 1e-5) -> int:
    """The one-line verdict on two metrics files of the same training (run `a`, reference `b`).

    Training amplifies rounding: two runs that differ only in the order of their sums agree
    to fp32 precision for the first steps, then drift apart (each Adam update divides by a
    gradient's root mean square, so tiny differences in small gradients grow). So the losses
    must agree within `rtol` for the first `exact_steps` steps, and afterwards by no more than
    twice the drift between `noise` (the reference's training with only its summation order
    changed) and `b`."""
    a, b = _losses(path_a), _losses(path_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"verdict: no common steps in {path_a} and {path_b}")
        return 1
    early_gap, early_step = _max_relative_gap(a, b, steps[:exact_steps])
    gap, worst = _max_relative_gap(a, b, steps)
    ok = early_gap <= rtol
    parts = [f"the first {min(exact_steps, len(steps))} steps agree to {early_gap:.1e} (fp32 tolerance {rtol:.0e})"]
    if noise:
        floor, _ = _max_relative_gap(_losses(noise), b, steps)
        ok = ok and gap <= max(2 * floor, rtol)
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst}), against a drift of "
                     f"{floor:.1e} from the summation order alone")
    else:
        ok = ok and gap <= rtol
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst})")
    last = steps[-1]
    head = f"{a[last]['layout']}{' sp' if a[last].get('sp') else ''} vs {b[last]['layout']}"
    print(f"verdict: {'MATCH' if ok else 'MISMATCH'} - {head}: " + "; ".join(parts)
          + f"; loss {b[steps[0]]['loss']:.4f} -> {a[last]['loss']:.4f} vs {b[last]['loss']:.4f}")
    return 0 if ok else 1
