"""Loading a model's weights from a local safetensors directory, each rank reading only its shards.

The directory is the ``save_pretrained`` layout: ``model.safetensors``, or several files named by
``model.safetensors.index.json``'s ``weight_map``. A model is built with its parameters on the
meta device (:func:`meta_parameters`, or a ``torch.device("meta")`` context for models without
buffers computed at construction), parallelized (its parallel layers then carry the
:class:`~hybridpar_ext.parallel.spec.ShardSpec` of each local parameter, on meta still or
empty), and :func:`load_safetensors` allocates each parameter at its local shape (or takes the
empty one) and fills it from the file with ``safe_open(...).get_slice(name)[...]``, segment by
segment: a rank never holds a global tensor, so its memory while loading is its shard plus the
pages of the one tensor being read.

Each tensor is read through its own short-lived ``safe_open``: safetensors maps the file, and a
slice across the inner dimension (a row-parallel weight's columns) touches every page of that
tensor; closing the file after each tensor lets those pages go instead of accumulating the
whole file in the process's memory.
"""

import contextlib
import json
import os
from typing import Dict, Optional

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsDirectory:
    """The tensors of a ``save_pretrained`` directory: which file holds each name, and the
    slices of them a shard spec asks for."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"SafetensorsDirectory: {self.path!r} is not a directory")
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"SafetensorsDirectory: cannot read the weight_map of {index}: {e}") from e
            self.files = {name: os.path.join(self.path, file) for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"SafetensorsDirectory: {index} names {file}, which is missing")
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(f"SafetensorsDirectory: {self.path!r} holds neither {SINGLE_FILE} "
                                    f"nor {INDEX_FILE}")

    def __contains__(self, name):
        return name in self.files

    def _file(self, name):
        if name not in self.files:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self.files[name]

    def shape(self, name):
        from safetensors import safe_open

        with safe_open(self._file(name), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name, spec=None, dtype: Optional[torch.dtype] = None, device="cpu") -> torch.Tensor:
        """The tensor `name`, or with a `spec` (a ShardSpec: ``global_shape``, ``dim``,
        ``segments`` of ``(start, length)``, ``padding``) only this rank's local tensor: its
        segments read one by one into a tensor of the local shape on `device`, then ``padding``
        zeros. The result owns its memory (safetensors' slices are views of the mapped file)."""
        from safetensors import safe_open

        with safe_open(self._file(name), framework="pt") as f:
            sliced = f.get_slice(name)
            shape = tuple(sliced.get_shape())
            if spec is not None and shape != tuple(spec.global_shape):
                raise ValueError(f"{self.path}: tensor {name!r} has shape {shape}, the model expects "
                                 f"{tuple(spec.global_shape)}")
            if spec is None or not shape:
                views = [sliced[...]]
            else:
                # (A rank holding only padding still reads an empty slice, for the file's dtype.)
                views = []
                for start, length in [(s.start, s.length) for s in spec.segments] or [(0, 0)]:
                    index = [slice(None)] * len(shape)
                    index[spec.dim] = slice(start, start + length)
                    views.append(sliced[tuple(index)])
            local_shape = shape if spec is None or not shape else tuple(spec.local_shape)
            out = torch.empty(local_shape, dtype=dtype or views[0].dtype, device=device)
            offset = 0
            for view in views:
                if not shape:
                    out.copy_(view)
                    continue
                out.narrow(spec.dim if spec is not None else 0, offset,
                           view.shape[spec.dim] if spec is not None else view.shape[0]).copy_(view)
                offset += view.shape[spec.dim] if spec is not None else view.shape[0]
            if spec is not None and spec.padding and shape:
                out.narrow(spec.dim, offset, spec.padding).zero_()
            del views, sliced
        return out


def read_shard(directory, name: str, spec=None, dtype: Optional[torch.dtype] = None,
               device="cpu") -> torch.Tensor:
    """This rank's local tensor of parameter `name` under `spec` (a ShardSpec; None: the whole
    tensor), read slice by slice from the safetensors directory `directory`."""
    if not isinstance(directory, SafetensorsDirectory):
        directory = SafetensorsDirectory(directory)
    return directory.read(name, spec, dtype, device)


@contextlib.contextmanager
def meta_parameters():
    """Builds modules with their parameters on the meta device and their buffers as usual (a
    rotary embedding's ``inv_freq``, computed at construction, stays real), as accelerate's
    ``init_empty_weights(include_buffers=False)``."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _tied_names(model) -> Dict[str, str]:
    """Hugging Face's tied parameters (``lm_head.weight`` -> ``model.embed_tokens.weight``),
    which ``save_pretrained`` writes once, under the name they are tied to."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def load_safetensors(model: torch.nn.Module, directory, device=None, dtype: Optional[torch.dtype] = None,
                     aliases: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Fills every parameter of `model` from the safetensors `directory`, reading only this
    rank's segments (the ShardSpec its module carries; none: the whole tensor). A parameter on
    the meta device is allocated at its local shape on `device` (default CPU), in `dtype` if
    floating and given, else its own; one already allocated (:func:`~.plan.materialize`) is
    copied into in place. Buffers are read when the files hold them; one on the meta device
    that they do not hold is an error (a real one, computed at construction like a rotary
    embedding's ``inv_freq``, is left as it is). Parameters tied in `model` stay tied.

    A name missing from the files is looked up under ``aliases[name]``, the spec's ``tied_to``
    or the model's Hugging Face tied-weights map. Returns ``{parameter or buffer name: name
    read in the files}``. Raises, before anything is read or allocated, if a tensor is missing
    or has the wrong shape."""
    from .spec import spec_of

    files = directory if isinstance(directory, SafetensorsDirectory) else SafetensorsDirectory(directory)
    aliases = {**_tied_names(model), **(aliases or {})}

    # Plan every read first, so that a missing tensor fails before anything is allocated.
    plan = []  # (module, attribute, is_param, qualified name, file name, spec)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, t in tensors.items():
                if t is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                spec = spec_of(module, attr) if kind == "param" else None
                source = full
                if source not in files:
                    source = (aliases.get(full) or (spec.tied_to if spec is not None else None)
                              or full)
                if source not in files:
                    if kind == "buffer" and not t.is_meta:
                        continue   # computed at construction (a rotary embedding's inv_freq)
                    raise KeyError(f"load_safetensors: {files.path} has no tensor for the {kind} "
                                   f"{full!r}" + (f" (nor {source!r})" if source != full else ""))
                expected = tuple(spec.global_shape) if spec is not None else tuple(t.shape)
                if files.shape(source) != expected:
                    raise ValueError(f"load_safetensors: {files.path} holds {source!r} of shape "
                                     f"{files.shape(source)}, {full!r} expects {expected}")
                plan.append((module, attr, kind == "param", full, source, spec))

    done, loaded = {}, {}
    for module, attr, is_param, full, source, spec in plan:
        tensors = module._parameters if is_param else module._buffers
        old = tensors[attr]
        if id(old) not in done:
            if old.is_meta:
                want = dtype if (dtype is not None and old.dtype.is_floating_point) else old.dtype
                value = files.read(source, spec, want, device or "cpu")
                if tuple(value.shape) != tuple(old.shape):
                    raise ValueError(f"load_safetensors: {full!r} read as {tuple(value.shape)}, the "
                                     f"module holds {tuple(old.shape)}")
                done[id(old)] = (torch.nn.Parameter(value, requires_grad=old.requires_grad)
                                 if is_param else value)
            else:
                value = files.read(source, spec, old.dtype, old.device)
                if tuple(value.shape) != tuple(old.shape):
                    raise ValueError(f"load_safetensors: {full!r} read as {tuple(value.shape)}, the "
                                     f"module holds {tuple(old.shape)}")
                with torch.no_grad():
                    old.copy_(value)
                done[id(old)] = old
        tensors[attr] = done[id(old)]
        loaded[full] = source
    return loaded


__all__ = ["SafetensorsDirectory", "load_safetensors", "meta_parameters", "read_shard"]
