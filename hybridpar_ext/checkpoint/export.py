"""Consolidated weights out of a checkpoint, and back into any layout.

:func:`export_checkpoint` (``python -m hybridpar_ext export DIR OUT``) reads the newest complete
checkpoint of DIR (or DIR itself, if it is one) in one process and writes the directory OUT in
the ``save_pretrained`` layout: ``model.safetensors`` with the plain model's state_dict (global
shapes, no vocabulary padding) and ``config.json``. For a Hugging Face model that is its own
config, so ``from_pretrained(OUT)`` loads it (a tied ``lm_head.weight`` is left out, as
``save_pretrained`` does); for our GPT, its :class:`~hybridpar_ext.models.GPTConfig` with
``"hybridpar_model": "gpt"`` (and every key of the GPT's state_dict, so
``GPT(config).load_state_dict(..., strict=True)`` takes it).

:func:`load_export` (``train --init-from OUT``) fills a parallelized stage of any layout from
such a directory, each rank reading only its own segments.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from .state import MODEL, _modules

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
GPT_MARK = "hybridpar_model"


# What fixes a Hugging Face decoder's tensors (the rest of its config may differ between runs).
HF_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "tie_word_embeddings")


def is_hf_config(config) -> bool:
    """A Hugging Face config (not our GPTConfig; both may be dataclasses)."""
    return hasattr(config, "model_type") and hasattr(config, "to_dict")


def model_description(config) -> dict:
    """The model a checkpoint belongs to, as JSON: our GPT's config, or what fixes the shapes
    of a Hugging Face model's tensors."""
    if is_hf_config(config):
        return hf_description(config.to_dict())
    return {"kind": "gpt", "config": dataclasses.asdict(config)}


def hf_config_dict(config) -> dict:
    """A Hugging Face config as the ``config.json`` that ``from_pretrained`` reads back."""
    return dict(config.to_dict(), model_type=config.model_type)


def hf_description(config: dict) -> dict:
    return {"kind": "hf", "architectures": config.get("architectures"),
            "shapes": {k: config.get(k) for k in HF_SHAPE_KEYS}}


def _checkpoint_path(path) -> Path:
    from .manager import INFO_FILE, latest_checkpoint

    path = Path(path)
    if (path / INFO_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"export: {path} is neither a checkpoint nor a directory holding a complete one")
    return latest[1]


def consolidated_state_dict(path) -> dict:
    """``{parameter name: global tensor}`` of the checkpoint in `path`, read in this process
    (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in saved.items()
               if k.startswith(MODEL) and isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return {k[len(MODEL):]: v for k, v in tensors.items()}


def export_checkpoint(directory, out) -> Path:
    """Write the weights of the newest complete checkpoint in `directory` to the directory
    `out` (``model.safetensors`` and ``config.json``). Returns the checkpoint exported."""
    from safetensors.torch import save_file

    from .manager import read_info

    path = _checkpoint_path(directory)
    info = read_info(path)
    model = info.get("model") or {}
    weights = consolidated_state_dict(path)
    if model.get("kind") == "gpt":
        config = dict(model["config"], **{GPT_MARK: "gpt"})
        if model["config"].get("tied_embeddings") and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed.weight"].clone()   # the GPT's state_dict has both
    elif model.get("kind") == "hf":
        config = info["hf_config"]
        if config.get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)
    else:
        raise ValueError(f"export: the checkpoint {path} does not say which model it holds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(weights.items())}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_export_config(path) -> dict:
    """The model an export holds, described as the trainer describes its own
    (:func:`hybridpar_ext.train.checkpointing.model_description`)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} is not an export: it must hold {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.pop(GPT_MARK, None) == "gpt":
        return {"kind": "gpt", "config": config}
    return hf_description(config)


def load_export(path, stage, optimizer=None) -> None:
    """Fill `stage` (a parallelized module, or a rank's list of model chunks) from the export
    in `path`, reading only this rank's segments; refresh a ZeRO-1 optimizer's fp32 masters."""
    from ..parallel.data import ZeroAdamW
    from ..parallel.loading import load_safetensors

    for module in _modules(stage):
        load_safetensors(module, path)
    if isinstance(optimizer, ZeroAdamW):
        from .state import zero_ranges
        with torch.no_grad():
            for _, _, p, start, master, _ in zero_ranges(optimizer, stage):
                master.copy_(p.detach().reshape(-1)[start:start + master.numel()])


__all__ = ["consolidated_state_dict", "export_checkpoint", "hf_config_dict", "hf_description", "is_hf_config", "load_export", "model_description",
           "read_export_config"]
