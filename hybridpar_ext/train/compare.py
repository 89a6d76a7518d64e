"""``python -m hybridpar_ext compare-runs``: do two trainings' metrics files have the same losses?

Two verdicts, chosen by the dtype the runs recorded:

- **float64** (both runs ``--dtype float64``): exact. The tolerance is derived, not measured.
  At step 1 both runs compute the same float64 loss from the same weights and tokens, only
  summing in other orders; a sum of ``n`` terms moves by about ``sqrt(n) * u`` that way
  (``u = 2**-53``, float64's unit roundoff), and the loss goes through sums of up to a few
  thousand terms (the hidden width, the vocabulary, the tokens of a batch): ``64u``. Each
  optimizer step carries the difference forward and Adam amplifies it (an update divides by
  the root of its gradient's second moment, so small gradients turn rounding into relative
  change); we bound that growth by a factor 2 per step (rounding differences grow by about 1.6
  per step in this trainer, in float32 and float64 alike). So rounding alone keeps step ``k``
  within ``64u * 2**k`` relative of the reference: 1.4e-14 at step 1, 7.6e-6 at step 30. A
  real difference (a missing gradient term, a wrong shard, one gradient off by 1e-6) is many
  orders larger. Steps whose bound passes 1e-5 are not judged (rounding could have grown to
  the size of a real error by then).
- **float32**: the losses must agree within ``rtol`` for the first ``exact_steps`` steps, then
  (with ``noise``, the reference trained again with only its summation order changed) stay
  within twice the drift that re-run shows. That drift is ONE sample of rounding noise, not a
  bound: on another CPU the math library sums in other orders and the sample can be hundreds
  of times smaller or larger, so this verdict can be fooled either way. Use float64 to decide.
"""

import json
from pathlib import Path

U64 = 2.0 ** -53          # float64 unit roundoff
STEP1_ULPS = 64           # rounding of the step-1 loss, in units of U64 (sqrt of a few thousand)
GROWTH_PER_STEP = 2.0     # the most one optimizer step amplifies a rounding difference
JUDGED_UP_TO = 1e-5       # steps whose rounding bound passes this are not judged


def rounding_bound(step: int) -> float:
    """How far (relative) rounding alone can move a float64 loss after `step` steps."""
    return STEP1_ULPS * U64 * GROWTH_PER_STEP ** step


def _losses(path: str) -> dict:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def _gaps(a: dict, b: dict, steps) -> dict:
    return {s: abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in steps}


def _max_relative_gap(a: dict, b: dict, steps) -> tuple:
    gaps = _gaps(a, b, steps)
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def _dtype(run: dict) -> str:
    return next(iter(run.values())).get("dtype", "float32")   # files from before dtypes were recorded


def compare_runs(path_a: str, path_b: str, noise: str = None, exact_steps: int = 5, rtol: float = 1e-5) -> int:
    """Print the one-line verdict on two metrics files of the same training (run `a`,
    reference `b`); 0 if they match, 1 if not (see the module docstring for the two verdicts)."""
    a, b = _losses(path_a), _losses(path_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"verdict: no common steps in {path_a} and {path_b}")
        return 1
    last = steps[-1]
    head = f"{a[last]['layout']}{' sp' if a[last].get('sp') else ''} vs {b[last]['layout']}"
    tail = f"; loss {b[steps[0]]['loss']:.4f} -> {a[last]['loss']:.4f} vs {b[last]['loss']:.4f}"
    dtypes = (_dtype(a), _dtype(b))
    if dtypes[0] != dtypes[1]:
        print(f"verdict: MISMATCH - {head}: {dtypes[0]} against {dtypes[1]}; compare runs of one dtype")
        return 1
    if dtypes == ("float64", "float64"):
        ok, text = _exact_verdict(a, b, steps)
    else:
        ok, text = _float32_verdict(a, b, steps, noise, exact_steps, rtol)
    print(f"verdict: {'MATCH' if ok else 'MISMATCH'} - {head} in {dtypes[0]}: {text}{tail}")
    return 0 if ok else 1


def _exact_verdict(a: dict, b: dict, steps) -> tuple:
    judged = [s for s in steps if rounding_bound(s) <= JUDGED_UP_TO]
    if not judged:
        return False, f"no step to judge (the rounding bound passes {JUDGED_UP_TO:.0e} from step 1)"
    gaps = _gaps(a, b, judged)
    worst = max(judged, key=lambda s: gaps[s] / rounding_bound(s))
    ratio = gaps[worst] / rounding_bound(worst)
    rule = (f"rounding alone keeps step k within {STEP1_ULPS}u * {GROWTH_PER_STEP:g}^k of the reference "
            f"(u = 2^-53; {STEP1_ULPS}u: sums of a few thousand terms in other orders at step 1; "
            f"x{GROWTH_PER_STEP:g}: the most an Adam update amplifies it per step)")
    unjudged = f" ({len(steps) - len(judged)} later steps not judged: their bound passes {JUDGED_UP_TO:.0e})" \
        if len(judged) < len(steps) else ""
    widest = max(judged, key=gaps.get)
    if ratio <= 1:
        text = (f"all {len(judged)} steps within it{unjudged}; the widest gap {gaps[widest]:.1e} (step {widest}), "
                f"the closest to its bound step {worst}: {gaps[worst]:.1e} apart = {ratio:.1e} of "
                f"{rounding_bound(worst):.1e}")
    else:
        text = (f"step {worst} is {gaps[worst]:.1e} apart, {ratio:.1e} times its bound "
                f"{rounding_bound(worst):.1e}{unjudged}")
    return ratio <= 1, f"{rule}; {text}"


def _float32_verdict(a: dict, b: dict, steps, noise, exact_steps, rtol) -> tuple:
    early_gap, _ = _max_relative_gap(a, b, steps[:exact_steps])
    gap, worst = _max_relative_gap(a, b, steps)
    ok = early_gap <= rtol
    parts = [f"the first {min(exact_steps, len(steps))} steps agree to {early_gap:.1e} (tolerance {rtol:.0e})"]
    if noise:
        floor, _ = _max_relative_gap(_losses(noise), b, steps)
        ok = ok and gap <= max(2 * floor, rtol)
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst}), within twice the "
                     f"{floor:.1e} that one re-run with another summation order drifted (one sample of "
                     "rounding noise, not a bound: for an exact verdict train both in --dtype float64)"
                     if ok else
                     f"over {len(steps)} steps at most {gap:.1e} apart (step {worst}), more than twice the "
                     f"{floor:.1e} that one re-run with another summation order drifted (one sample of "
                     "rounding noise, not a bound: for an exact verdict train both in --dtype float64)")
    else:
        ok = ok and gap <= rtol
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst})")
    return ok, "; ".join(parts)
