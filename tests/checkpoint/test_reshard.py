"""DCP checkpoints of a tensor-parallel GPT reshard exactly: saved with tp 2 (fused qkv with a
kv head replicated over both ranks, a [gate; up] weight, a vocabulary padded to a multiple of
tp, a tied embedding), loaded with tp 1 or another layout, every weight is bitwise the global
one. And the trap of pytorch#156002 (DCP keeps one copy of plain tensors sharing a name) is
shown to be real, and not to catch us."""

import pytest
import torch

from hybridpar_ext.testing import run_ranks

# kv_heads 1 < tp 2: the kv head is replicated; swiglu: [gate; up]; vocab 97 pads to 98 at tp 2.
CONFIG = dict(vocab_size=97, max_seq_len=16, layers=3, hidden=64, heads=4, kv_heads=1, ffn=80,
              norm="rmsnorm", mlp="swiglu", tied_embeddings=True)


def _global_weights():
    """The plain model's weights, made unlike their initial values (so a load that did
    nothing, or loaded an initialisation, shows)."""
    from hybridpar_ext.models import GPT, GPTConfig

    torch.manual_seed(3)
    model = GPT(GPTConfig(**CONFIG))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model


def _stage(dp, tp, pp, seed):
    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import init_mesh, parallelize

    mesh = init_mesh(dp=dp, tp=tp, pp=pp)
    torch.manual_seed(seed)
    return parallelize(GPT(GPTConfig(**CONFIG)), mesh), mesh


def save_tp2(rank, world, path, naive_path=None):
    """Save the tp 2 model with our checkpoints; with `naive_path` also as pytorch#156002 does:
    each rank's tensor-parallel slices as plain tensors. Returns the kinds of the entries
    our save hands to DCP."""
    import torch.distributed.checkpoint as dcp

    from hybridpar_ext.checkpoint import save_state
    from hybridpar_ext.checkpoint.saving import build_entries
    from hybridpar_ext.parallel import init_mesh, parallelize

    mesh = init_mesh(dp=1, tp=2, pp=1)
    stage = parallelize(_global_weights(), mesh)
    save_state(path, stage, None, mesh)
    if naive_path:
        dcp.save({n: p.detach() for n, p in stage.named_parameters()}, checkpoint_id=naive_path)
    entries, _ = build_entries(stage, None, mesh, for_save=True)
    return {k: type(v).__name__ for k, v in entries.values.items()}


def load_and_compare(rank, world, path, layouts):
    from hybridpar_ext.checkpoint import load_state
    from hybridpar_ext.parallel import gather_state_dict

    expected = _global_weights().state_dict()
    for dp, tp, pp in layouts:
        stage, mesh = _stage(dp, tp, pp, seed=99)   # other weights, overwritten by the load
        load_state(path, stage, None, mesh)
        full = gather_state_dict(stage, mesh)
        assert set(full) == set(expected), sorted(set(full) ^ set(expected))
        different = [name for name, w in expected.items() if not torch.equal(full[name], w)]
        assert not different, f"dp{dp} tp{tp} pp{pp}: not bitwise equal after the load: {different}"
    return len(expected)


# The layouts of two ranks that load the tp 2 save, in the processes that saved it.
RELOAD_ON_TWO = [(1, 1, 2), (2, 1, 1)]


def save_and_reload(rank, world, path, naive_path):
    """save_tp2, then load_and_compare under RELOAD_ON_TWO, in one launch."""
    import torch.distributed as dist

    kinds = save_tp2(rank, world, path, naive_path)
    dist.barrier()
    return {"kinds": kinds, "reloaded": load_and_compare(rank, world, path, RELOAD_ON_TWO)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    path, naive = str(root / "ours"), str(root / "naive")
    results = run_ranks(save_and_reload, 2, timeout=240, path=path, naive_path=naive)
    return path, naive, [r["kinds"] for r in results], [r["reloaded"] for r in results]


def test_tp2_checkpoint_loads_bitwise_under_tp1_and_other_layouts(saved):
    path, _, _, reloaded = saved
    # Under dp1 tp1 pp2 and dp2 (RELOAD_ON_TWO), checked in the launch that saved.
    assert reloaded == [len(_global_weights().state_dict())] * 2
    run_ranks(load_and_compare, 1, timeout=120, path=path, layouts=[(1, 1, 1)])


def test_every_saved_tensor_is_the_global_one(saved):
    """Each parameter is saved once, in its global shape, its chunks tiling it exactly."""
    from hybridpar_ext.checkpoint import saved_names
    from hybridpar_ext.checkpoint.state import MODEL

    expected = {MODEL + n: p.shape for n, p in _global_weights().named_parameters()}
    md = saved_names(saved[0])
    assert set(md) == set(expected)
    for key, shape in expected.items():
        assert md[key].size == shape, key
        assert sum(torch.Size(c.sizes).numel() for c in md[key].chunks) == shape.numel(), key
    # the fused qkv of 4 heads of 16 and one kv head: each rank's two q heads, then the one
    # kv head's k and v, saved once although both ranks hold them
    qkv = md[MODEL + "layers.0.attn.qkv.weight"]
    assert sorted((c.offsets[0], c.sizes[0]) for c in qkv.chunks) == [(0, 32), (32, 32), (64, 16), (80, 16)]
    # the padded vocabulary: rank 1 holds rows 49..96 and one row of padding, not saved
    embed = md[MODEL + "embed.weight"]
    assert sorted((c.offsets[0], c.sizes[0]) for c in embed.chunks) == [(0, 49), (49, 48)]


def test_plain_tensors_of_tp_slices_lose_data_and_ours_do_not(saved):
    """pytorch#156002: the trap is real in this torch (DCP kept one rank's slice, half of
    [gate; up], as if it were the tensor); our save hands DCP no plain tensor for any
    parameter, and keeps the global shape."""
    from hybridpar_ext.checkpoint import saved_names
    from hybridpar_ext.checkpoint.state import MODEL

    path, naive, kinds, _ = saved
    full = dict(_global_weights().named_parameters())
    name = "layers.0.mlp.fc1.weight"
    assert saved_names(naive)[name].size[0] == full[name].shape[0] // 2
    assert saved_names(path)[MODEL + name].size == full[name].shape
    for rank_kinds in kinds:
        assert rank_kinds and set(rank_kinds.values()) == {"Chunked"}, rank_kinds
