"""A layout the user names, as text: ``"dp2 tp4 pp4 v2 mb1 sp zero1 recompute=full"``.

The grammar, one token per feature, separated by spaces (or commas), in any order:

``dpN``, ``tpN``, ``ppN``
    data, tensor and pipeline parallel sizes; each defaults to 1, except that a missing ``dp``
    is what the GPUs leave (``gpus / (tp * pp)``).
``mbN``
    sequences per microbatch (default 1); the microbatches per step follow from the global
    batch. ``mN`` names the microbatch count instead, and ``mb=NxM`` (what the planner's table
    prints) both.
``vN``
    model chunks per pipeline rank (interleaved 1F1B when ``N > 1``).
``1f1b``, ``interleaved``, ``zb`` (or ``zero-bubble``)
    the pipeline schedule; default interleaved when ``v > 1``, else 1F1B.
``sp``
    sequence parallelism. ``zero1`` (or ``zero``): ZeRO-1 optimizer sharding.
``recompute=none|selective|full`` (or ``rc=...``)
    activation recomputation; default none.

Every layout the planner prints parses back to itself.
"""

import re

from .costs import RECOMPUTE, Layout

GRAMMAR = ("dpN tpN ppN mbN (or mN, mb=NxM) vN 1f1b|interleaved|zb sp zero1 "
           "recompute=none|selective|full")
_SCHEDULE_WORDS = {"1f1b": "1f1b", "interleaved": "interleaved", "zb": "zero-bubble",
                   "zero-bubble": "zero-bubble"}


def parse_layout(text: str, gpus: int, global_batch: int) -> Layout:
    """The :class:`Layout` that `text` names on `gpus` GPUs with `global_batch` sequences per
    step. ValueError naming the token that does not parse, or the numbers that do not add up."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--layout: expected tokens like {GRAMMAR!r}, got {text!r}")
    sizes = {}
    for token in re.split(r"[\s,]+", text.strip().lower()):
        number = re.fullmatch(r"(dp|tp|pp|mb|m|v)(\d+)", token)
        both = re.fullmatch(r"mb=(\d+)x(\d+)", token)
        if number:
            key, value = number.group(1), int(number.group(2))
            if value < 1:
                raise ValueError(f"--layout: {token!r} must be at least 1")
        elif both:
            key, value = "mb=", (int(both.group(1)), int(both.group(2)))
        elif token in _SCHEDULE_WORDS:
            key, value = "schedule", _SCHEDULE_WORDS[token]
        elif token in ("sp", "zero", "zero1"):
            key, value = ("sp" if token == "sp" else "zero1"), True
        elif re.fullmatch(r"(recompute|rc)=\w+", token):
            key, value = "recompute", token.split("=", 1)[1]
            if value not in RECOMPUTE:
                raise ValueError(f"--layout: {token!r}: recompute must be one of {', '.join(RECOMPUTE)}")
        else:
            raise ValueError(f"--layout: unknown token {token!r} in {text!r}; expected {GRAMMAR}")
        clashes = {"mb=": ("mb", "m"), "mb": ("mb=",), "m": ("mb=",)}.get(key, ())
        if key in sizes or any(k in sizes for k in clashes):
            raise ValueError(f"--layout: {token!r} says again what an earlier token of {text!r} said")
        sizes[key] = value
    schedule, recompute = sizes.pop("schedule", ""), sizes.pop("recompute", "none")
    flags = {k: sizes.pop(k, False) for k in ("sp", "zero1")}
    tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
    if gpus % (tp * pp):
        raise ValueError(f"--layout: tp{tp} x pp{pp} = {tp * pp} does not divide the {gpus} GPUs")
    dp = sizes.get("dp", gpus // (tp * pp))
    if dp * tp * pp != gpus:
        raise ValueError(f"--layout: dp{dp} x tp{tp} x pp{pp} = {dp * tp * pp} GPUs, but there are {gpus}")
    if global_batch % dp:
        raise ValueError(f"--layout: dp{dp} does not divide the global batch of {global_batch} sequences")
    share = global_batch // dp
    micro, count = sizes.get("mb=", (sizes.get("mb"), sizes.get("m")))
    if micro is None and count is None:
        micro = 1
    if micro is None:
        micro = share // count if share % count == 0 else 0
    if count is None:
        count = share // micro if share % micro == 0 else 0
    if not micro or not count or micro * count != share:
        raise ValueError(f"--layout: each of the dp{dp} ranks takes {share} sequences per step, which "
                         f"{text!r} does not split into microbatches (mbN x mN must be {share})")
    try:
        return Layout(dp, tp, pp, micro, count, flags["sp"], recompute, flags["zero1"],
                      sizes.get("v", 1), schedule)
    except ValueError as err:
        raise ValueError(f"--layout {text!r}: {err}") from None
