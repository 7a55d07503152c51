"""Read and edit what a transformer computes inside, under TransformerLens's names.

A decoder block adds two things to the residual stream: ``x + attn(norm(x))``, then
``+ mlp(norm(.))``. These names (TransformerLens's, so ARENA readers know them) expose every
intermediate of block ``i``, shapes for B sequences of T tokens:

    hook_embed                     [B, T, d_model]          token embeddings (no position vector in Llama)
    blocks.{i}.hook_resid_pre      [B, T, d_model]          what block i reads
    blocks.{i}.attn.hook_pattern   [B, n_heads, T_q, T_k]   softmax weights; row q sums to 1
    blocks.{i}.attn.hook_z         [B, T, n_heads, d_head]  each head's output, before o_proj mixes them
    blocks.{i}.hook_attn_out       [B, T, d_model]          what attention adds
    blocks.{i}.hook_resid_mid      [B, T, d_model]          = resid_pre + attn_out
    blocks.{i}.hook_mlp_out        [B, T, d_model]          what the MLP adds
    blocks.{i}.hook_resid_post     [B, T, d_model]          = resid_mid + mlp_out = resid_pre of block i+1

Reading (always detached copies on CPU; hooks removed on exit, also after an exception)::

    >>> model, tok = labkit.load_model()                                  # doctest: +SKIP
    >>> with capture(model, "hook_resid_post") as cache:                  # doctest: +SKIP
    ...     model(ids)
    >>> cache["blocks.3.hook_resid_post"].shape                           # doctest: +SKIP
    torch.Size([1, 12, 576])
    >>> logits, cache = run_with_cache(model, ids, ["attn.hook_pattern"]) # doctest: +SKIP
    >>> cache.stack("attn.hook_pattern").shape     # [layer, B, head, q, k]  # doctest: +SKIP
    >>> cache.save("runs/base.safetensors")        # compare runs offline    # doctest: +SKIP

Editing (ablations, patching)::

    >>> zero = lambda x, name: torch.zeros_like(x)                        # doctest: +SKIP
    >>> with patch(model, {"blocks.0.hook_mlp_out": zero}):               # doctest: +SKIP
    ...     loss = model(ids, labels=ids).loss

Which models: Hugging Face Llama-family decoders (Llama, SmolLM2, Qwen2/3, Mistral: blocks
with ``self_attn``, ``mlp``, ``post_attention_layernorm``), also wrapped by peft. Any other
model plugs in by defining ``hook_points()`` returning ``{name: HookSite}`` (the labkit GPT
does, via its HookPoint modules); nothing else here changes. Attention patterns need eager attention (SDPA never
materialises the weights): ``labkit.load_model()`` loads eager by default.

Grouped-query attention (GQA): SmolLM2 has 9 query heads but only 3 key/value heads, so
query heads share keys and values in groups: ``kv_head_of(model.config)`` says which.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import torch
from torch import nn

NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
PatchFn = Callable[[torch.Tensor, str], torch.Tensor]   # (value, hook name) -> new value


@dataclass(frozen=True)
class HookSite:
    """Where one named activation lives: the ``input`` or ``output`` of ``module``.

    ``index`` picks one element when the module returns (or takes) a tuple; ``view`` and
    ``unview`` reshape between the module's layout and the name's layout (hook_z splits
    o_proj's input ``[B, T, n_heads*d_head]`` into ``[B, T, n_heads, d_head]``).
    ``patchable=False`` marks values the model has already used when we see them.
    """
    module: nn.Module
    site: str                      # "input" | "output"
    index: int | None = None
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    unview: Callable[[torch.Tensor], torch.Tensor] | None = None
    patchable: bool = True


# ----------------------------------------------------------------------------- model adapters

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Llama-family model (found by shape, so peft wrappers work)."""
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(
                hasattr(b, "self_attn") and hasattr(b, "mlp") and hasattr(b, "post_attention_layernorm")
                for b in mod):
            return mod
    raise TypeError(f"{type(model).__name__} has no Llama-family decoder blocks (a ModuleList of "
                    f"modules with self_attn, mlp, post_attention_layernorm); define "
                    f"model.hook_points() returning {{name: HookSite}} to plug it in")


def head_dims(config) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, d_head)`` from a HF config.

    >>> from transformers import LlamaConfig
    >>> head_dims(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3))
    (9, 3, 64)
    """
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, d_head


def kv_head_of(config) -> list[int]:
    """For each query head, the key/value head it reads (GQA): head h uses kv head h // (n_heads/n_kv).

    That is how HF's ``repeat_kv`` expands 3 kv heads to 9: each kv head repeated 3 times in a row.

    >>> from transformers import LlamaConfig
    >>> kv_head_of(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3))
    [0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    n_heads, n_kv, _ = head_dims(config)
    assert n_heads % n_kv == 0, f"{n_heads} query heads cannot share {n_kv} kv heads evenly"
    return [h // (n_heads // n_kv) for h in range(n_heads)]


def hook_points(model: nn.Module) -> dict[str, HookSite]:
    """Every hookable name of ``model``, in forward order.

    A model with its own ``hook_points()`` method decides for itself (the labkit GPT plugs in so).
    """
    if callable(getattr(model, "hook_points", None)):
        return model.hook_points()
    n_heads, _, d_head = head_dims(model.config)
    split = lambda z: z.unflatten(-1, (n_heads, d_head))     # [B,T,H*dh] -> [B,T,H,dh]
    merge = lambda z: z.flatten(-2)                          # [B,T,H,dh] -> [B,T,H*dh]
    points = {"hook_embed": HookSite(model.get_input_embeddings(), "output")}
    for i, block in enumerate(decoder_layers(model)):
        attn = block.self_attn
        points.update({
            f"blocks.{i}.hook_resid_pre": HookSite(block, "input", 0),
            # the eager attention returns (output, weights): the weights, after they were used
            f"blocks.{i}.attn.hook_pattern": HookSite(attn, "output", 1, patchable=False),
            f"blocks.{i}.attn.hook_z": HookSite(attn.o_proj, "input", 0, view=split, unview=merge),
            f"blocks.{i}.hook_attn_out": HookSite(attn, "output", 0),
            # resid_mid is *measured* (what the second norm reads), not computed as a sum, so
            # the test resid_mid == resid_pre + attn_out checks the names, not an identity
            f"blocks.{i}.hook_resid_mid": HookSite(block.post_attention_layernorm, "input", 0,
                                                    patchable=False),
            f"blocks.{i}.hook_mlp_out": HookSite(block.mlp, "output", None),
            f"blocks.{i}.hook_resid_post": HookSite(block, "output", None),
        })
    return points


def select(names: Iterable[str], names_filter: NamesFilter) -> list[str]:
    """The names a filter keeps: None = all; a string or list of strings = exact names or name
    suffixes ("hook_resid_post" means every layer's); a callable = a predicate.

    >>> names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    >>> select(names, "attn.hook_pattern")
    ['blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_pattern']
    >>> select(names, lambda n: n.startswith("blocks.0."))
    ['blocks.0.hook_resid_pre', 'blocks.0.attn.hook_pattern']
    """
    names = list(names)
    if names_filter is None:
        return names
    if callable(names_filter):
        keep = [n for n in names if names_filter(n)]
    else:
        wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        keep = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
    if not keep:  # a typo would otherwise capture nothing, silently
        raise ValueError(f"names_filter {names_filter!r} matches no hook; names look like "
                         f"{names[:3]} ... {names[-1]}")
    return keep


# ----------------------------------------------------------------------------- the cache

class ActivationCache(dict):
    """``{name: tensor}`` on CPU, plus stacking across layers and safetensors save/load.

    >>> c = ActivationCache({"blocks.0.hook_mlp_out": torch.ones(1, 2, 4),
    ...                      "blocks.1.hook_mlp_out": torch.zeros(1, 2, 4)})
    >>> c.stack("hook_mlp_out").shape      # [layer, B, T, d_model]
    torch.Size([2, 1, 2, 4])
    """

    def __init__(self, *args, metadata: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.metadata = dict(metadata or {})

    def stack(self, suffix: str) -> torch.Tensor:
        """Every layer's ``blocks.{i}.<suffix>``, stacked in layer order: ``[n_layers, ...]``."""
        layers = sorted((int(n.split(".")[1]), t) for n, t in self.items()
                        if n.startswith("blocks.") and n.endswith("." + suffix))
        if not layers:
            raise KeyError(f"no 'blocks.*.{suffix}' in this cache (it holds {sorted(self)[:4]} ...)")
        return torch.stack([t for _, t in layers])

    def save(self, path) -> Path:
        """Write every tensor (and ``metadata``, as JSON strings) to one .safetensors file."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: json.dumps(v) for k, v in self.metadata.items()}
        save_file({k: v.contiguous() for k, v in self.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path) -> "ActivationCache":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            return cls({k: f.get_tensor(k) for k in f.keys()}, metadata=meta)


# ----------------------------------------------------------------------------- hooks

def _input_key(kwargs) -> str:
    """The keyword carrying the hidden states when a module is called with keywords only."""
    return "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))


def _get(point: HookSite, args, kwargs, output, name: str):
    if point.site == "input":
        value = args[point.index] if args else kwargs[_input_key(kwargs)]
    else:
        value = output if point.index is None else output[point.index]
    if value is None:  # SDPA / flash attention return no weights
        raise RuntimeError(f"{name} is None: this model's attention does not return its weights "
                           f"(SDPA, flash). Load it with attn_implementation='eager' "
                           f"(labkit.load_model() does by default)")
    if isinstance(value, tuple):  # older HF blocks return (hidden_states,)
        value = value[0]
    return point.view(value) if point.view else value


def _register(point: HookSite, name: str, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    """Attach ``fn(value) -> new value or None`` to the point; None leaves the model untouched."""
    def replace(old, new, index):
        new = point.unview(new) if point.unview else new
        if index is None:
            return (new,) + tuple(old[1:]) if isinstance(old, tuple) else new
        return tuple(old[:index]) + (new,) + tuple(old[index + 1:])

    if point.site == "input":
        def pre_hook(module, args, kwargs):
            new = fn(_get(point, args, kwargs, None, name))
            if new is None:
                return None
            if args:
                return replace(args, new, point.index), kwargs
            key = _input_key(kwargs)
            return args, {**kwargs, key: point.unview(new) if point.unview else new}
        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        new = fn(_get(point, args, {}, output, name))
        return None if new is None else replace(output, new, point.index)
    return point.module.register_forward_hook(hook)


@contextlib.contextmanager
def capture(model: nn.Module, names_filter: NamesFilter = None):
    """Record the selected activations of every forward pass inside the ``with`` block.

    Values are detached copies on CPU (safe to keep, never holding the graph). A second
    forward pass in the same block overwrites the first (``cache.metadata["calls"]`` counts).
    The hooks are removed on exit, even when the forward pass raised.
    """
    points = hook_points(model)
    cache = ActivationCache(metadata={"calls": 0})
    handles = []

    def recorder(name):
        def record(value):
            cache[name] = value.detach().to("cpu", copy=True)
        return record

    def count(module, args):
        cache.metadata["calls"] += 1

    try:
        handles.append(model.register_forward_pre_hook(count))
        for name in select(points, names_filter):
            handles.append(_register(points[name], name, recorder(name)))
        yield cache
    finally:  # why try/finally: a hook left behind would silently slow and alter every later run
        for h in handles:
            h.remove()


@contextlib.contextmanager
def patch(model: nn.Module, fns: dict[str, PatchFn]):
    """Replace activations during the ``with`` block: ``{name: fn(value, name) -> new value}``.

    ``value`` is in the name's layout (hook_z: ``[B, T, n_heads, d_head]``, so one head is
    ``value[:, :, h]``). Patterns and resid_mid are read-only here: the model has already
    used them when the hook sees them; patch ``hook_z`` or ``hook_attn_out`` instead.
    """
    points = hook_points(model)
    unknown = [n for n in fns if n not in points]
    if unknown:
        raise KeyError(f"no hook named {unknown}; names look like {list(points)[1:4]}")
    frozen = [n for n in fns if not points[n].patchable]
    if frozen:
        raise ValueError(f"{frozen} cannot be patched (already used when seen); patch hook_z "
                         f"(per head) or hook_attn_out / hook_mlp_out instead")
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(_register(points[name], name, lambda v, fn=fn, name=name: fn(v, name)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_with_cache(model: nn.Module, input_ids: torch.Tensor, names_filter: NamesFilter = None,
                   **forward_kwargs) -> tuple[torch.Tensor, ActivationCache]:
    """One forward pass: ``(logits [B, T, vocab] on CPU, cache)``."""
    with capture(model, names_filter) as cache:
        out = model(input_ids=input_ids.to(model.device), **forward_kwargs)
    return out.logits.detach().cpu(), cache


def n_hooks(model: nn.Module) -> int:
    """How many forward (pre-)hooks are attached anywhere in ``model`` (0 when nothing leaked)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
