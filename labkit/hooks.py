"""Read and edit what a transformer computes inside, under TransformerLens's names.

A decoder block adds two things to the residual stream: what attention writes, then what the
MLP writes. These names (TransformerLens's, so ARENA readers know them) expose every
intermediate of block ``i``, shapes for B sequences of T tokens:

    hook_embed                     [B, T, d_model]          token embeddings (Gemma: already x sqrt(d_model))
    hook_pos_embed                 [B, T, d_model]          absolute positions (labkit GPT, learned/sinusoidal only)
    blocks.{i}.hook_resid_pre      [B, T, d_model]          what block i reads
    blocks.{i}.attn.hook_q         [B, T, n_heads, d_head]  queries, before RoPE (after q_norm where there is one)
    blocks.{i}.attn.hook_k / _v    [B, T, n_kv_heads, d_head]  keys (before RoPE) and values: GQA stores fewer
    blocks.{i}.attn.hook_rot_q/_k  [B, T, heads, d_head]    after RoPE (labkit GPT only: HF applies RoPE inline)
    blocks.{i}.attn.hook_attn_scores [B, n_heads, T_q, T_k] scaled, masked scores (labkit GPT only)
    blocks.{i}.attn.hook_pattern   [B, n_heads, T_q, T_k]   softmax weights; row q sums to 1
    blocks.{i}.attn.hook_z         [B, T, n_heads, d_head]  each head's output, before the output projection
    blocks.{i}.hook_attn_out       [B, T, d_model]          what attention adds to the residual stream
    blocks.{i}.hook_resid_mid      [B, T, d_model]          = resid_pre + attn_out
    blocks.{i}.mlp.hook_post       [B, T, d_mlp]            hidden activations (gated: act(gate) * up)
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

**One protocol.** A model plugs in by a ``hook_points()`` method returning ``{name: HookSite}``
(the labkit GPT does: its ``HookPoint`` modules, below); Hugging Face decoders are adapted here,
per architecture (``LAYOUTS``), because the *same* module names mean different things across
families: in Llama ``post_attention_layernorm`` is the norm *before the MLP*, in Gemma 2/3 and
OLMo 2 it normalises attention's *output* before the residual add. A layout is listed only
after the identities above were checked on a tiny random model of that family
(tests/test_hooks.py); any other architecture raises ``UnsupportedModelError`` naming the
supported ones, never a silently wrong name. Attention patterns need the weights materialised:
HF models must be loaded with ``attn_implementation="eager"`` (``labkit.load_model()`` does);
the labkit GPT switches to its written-out attention by itself while a pattern is hooked
(``HookSite.requires``), and back afterwards.

Grouped-query attention (GQA): SmolLM2 has 9 query heads but only 3 key/value heads, so
query heads share keys and values in groups: ``kv_head_of(model.config)`` says which.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Union

import torch
from torch import nn

NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
PatchFn = Callable[[torch.Tensor, str], torch.Tensor]   # (value, hook name) -> new value


# ----------------------------------------------------------------------------- the protocol

class HookPoint(nn.Identity):
    """An identity layer with a name: hook it to read or edit the tensor passing through
    (TransformerLens's HookPoint). Models built from them list them in ``hook_points()``."""


@dataclass(frozen=True)
class HookSite:
    """Where one named activation lives: the ``input`` or ``output`` of ``module``.

    ``index`` picks one element when the module returns (or takes) a tuple; ``view`` turns
    the module's layout into the name's (hook_z splits o_proj's input ``[B, T, n_heads*d_head]``
    into ``[B, T, n_heads, d_head]``); a patched value goes back through ``unview`` (default: a
    reshape to the module's shape).
    ``patchable=False`` marks values the model has already used when we see them.
    ``requires`` is entered while a hook is attached and left when it is removed: the labkit
    GPT's attention computes its pattern only while someone asks for it.
    """
    module: nn.Module
    site: str                      # "input" | "output"
    index: int | None = None
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    unview: Callable[[torch.Tensor], torch.Tensor] | None = None
    patchable: bool = True
    requires: Callable[[], ContextManager] | None = None


class UnsupportedModelError(TypeError):
    """A model whose decoder layout labkit.hooks does not know: names would be silently wrong."""


# ----------------------------------------------------------------------------- HF adapters

@dataclass(frozen=True)
class Layout:
    """Where, inside one HF decoder layer, attention's and the MLP's residual writes are read.

    Each entry is ``(path of a submodule, "input" | "output")``; the path is relative to the
    decoder layer. The three layouts differ only in where the norms sit.
    """
    attn_out: tuple[str, str]
    resid_mid: tuple[str, str]
    mlp_out: tuple[str, str]
    heads_first_qk_norm: bool = False   # Gemma 3 normalises q, k after moving heads first: [B, H, T, dh]


# Llama: x + attn(norm(x)); post_attention_layernorm is the *pre-MLP* norm.
PRE_NORM = Layout(attn_out=("self_attn", "output"), resid_mid=("post_attention_layernorm", "input"),
                  mlp_out=("mlp", "output"))
# Phi-3: the same, with a dropout on each residual write (identity in eval; read after it).
PRE_NORM_DROPOUT = Layout(attn_out=("resid_attn_dropout", "output"),
                          resid_mid=("post_attention_layernorm", "input"),
                          mlp_out=("resid_mlp_dropout", "output"))
# Gemma 2/3: "sandwich" norms, x + norm(attn(norm(x))): what is added is the *normed* output.
SANDWICH = Layout(attn_out=("post_attention_layernorm", "output"),
                  resid_mid=("pre_feedforward_layernorm", "input"),
                  mlp_out=("post_feedforward_layernorm", "output"))
GEMMA3 = replace(SANDWICH, heads_first_qk_norm=True)   # Gemma 3: the same, q and k normed per head
# OLMo 2: no pre-norms at all, x + norm(attn(x)); the MLP reads resid_mid itself.
POST_NORM = Layout(attn_out=("post_attention_layernorm", "output"), resid_mid=("mlp", "input"),
                   mlp_out=("post_feedforward_layernorm", "output"))

# model_type -> layout. Only families whose identities are tested (tests/test_hooks.py).
LAYOUTS: dict[str, Layout] = {
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM, "gemma": PRE_NORM,
    "gemma2": SANDWICH, "gemma3": GEMMA3, "gemma3_text": GEMMA3,
    "phi3": PRE_NORM_DROPOUT,
    "olmo2": POST_NORM,
}


def model_type_of(model: nn.Module) -> str:
    """The HF ``model_type`` of a (possibly peft-wrapped, possibly multimodal) causal LM."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has neither hook_points() nor a Hugging Face "
                                    f"config: define model.hook_points() returning {{name: HookSite}}")
    config = getattr(config, "text_config", None) or config   # Gemma 3 multimodal: its language model
    return config.model_type


def layout_of(model: nn.Module) -> Layout:
    """The decoder layout of an HF model; one clear error for an architecture not checked here."""
    kind = model_type_of(model)
    if kind not in LAYOUTS:
        raise UnsupportedModelError(
            f"labkit.hooks has no checked decoder layout for model_type={kind!r}; supported: "
            f"{', '.join(sorted(LAYOUTS))}. Families place their norms differently (Gemma 2/3 and OLMo 2 "
            f"normalise each sublayer's output), so guessing would give silently wrong names. "
            f"Use one of those, the labkit GPT, or add a Layout to labkit.hooks.LAYOUTS after its "
            f"identities pass (see tests/test_hooks.py).")
    return LAYOUTS[kind]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList of ``*DecoderLayer`` modules (so peft wrappers
    and multimodal models work: a vision tower's encoder layers are not decoder layers)."""
    layout_of(model)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(
                type(b).__name__.endswith("DecoderLayer") for b in mod):
            return mod
    raise UnsupportedModelError(f"{type(model).__name__} has no ModuleList of *DecoderLayer modules")


def head_dims(config) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, d_head)`` from a HF config.

    >>> from transformers import LlamaConfig
    >>> head_dims(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3))
    (9, 3, 64)
    """
    config = getattr(config, "text_config", None) or config
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
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} kv heads evenly")
    return [h // (n_heads // n_kv) for h in range(n_heads)]


def _split_heads(n: int, d_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, T, n*d_head]`` -> ``[B, T, n, d_head]`` (a tensor already split passes unchanged:
    Qwen3 and Gemma 3 normalise q and k per head, after splitting them)."""
    return lambda t: t if t.dim() == 4 else t.unflatten(-1, (n, d_head))


def _qkv_sites(attn: nn.Module, n_heads: int, n_kv: int, d_head: int, layout: Layout) -> dict[str, HookSite]:
    """hook_q / hook_k / hook_v of one HF attention module: the tensors scores are made of, before RoPE."""
    if hasattr(attn, "qkv_proj"):   # Phi-3 fuses the three projections: read-only slices of one output
        bounds = {"q": (0, n_heads * d_head), "k": (n_heads * d_head, (n_heads + n_kv) * d_head),
                  "v": ((n_heads + n_kv) * d_head, (n_heads + 2 * n_kv) * d_head)}
        return {f"attn.hook_{x}": HookSite(attn.qkv_proj, "output", None, patchable=False,
                                           view=lambda t, a=a, b=b, n=(b - a) // d_head:
                                           t[..., a:b].unflatten(-1, (n, d_head)))
                for x, (a, b) in bounds.items()}
    sites = {}
    for x, n in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
        norm = getattr(attn, f"{x}_norm", None)   # Qwen3, Gemma 3, OLMo 2 normalise q and k before RoPE
        if norm is not None and layout.heads_first_qk_norm:
            swap = lambda t: t.transpose(1, 2)                              # [B, H, T, dh] <-> [B, T, H, dh]
            sites[f"attn.hook_{x}"] = HookSite(norm, "output", None, view=swap, unview=swap)
            continue
        module = norm if norm is not None else getattr(attn, f"{x}_proj")
        sites[f"attn.hook_{x}"] = HookSite(module, "output", None, view=_split_heads(n, d_head))
    return sites


def hf_hook_points(model: nn.Module) -> dict[str, HookSite]:
    """The names above for a Hugging Face decoder of a supported family, in forward order."""
    layout = layout_of(model)
    n_heads, n_kv, d_head = head_dims(model.config)
    split = _split_heads(n_heads, d_head)
    points = {"hook_embed": HookSite(model.get_input_embeddings(), "output")}
    for i, block in enumerate(decoder_layers(model)):
        attn = block.self_attn
        site = lambda where, **kw: HookSite(block.get_submodule(where[0]), where[1],
                                             0 if where[1] == "input" or where[0] == "self_attn" else None, **kw)
        points[f"blocks.{i}.hook_resid_pre"] = HookSite(block, "input", 0)
        points.update({f"blocks.{i}.{k}": v for k, v in _qkv_sites(attn, n_heads, n_kv, d_head, layout).items()})
        points.update({
            # the eager attention returns (output, weights): the weights, after they were used
            f"blocks.{i}.attn.hook_pattern": HookSite(attn, "output", 1, patchable=False),
            f"blocks.{i}.attn.hook_z": HookSite(attn.o_proj, "input", 0, view=split),
            f"blocks.{i}.hook_attn_out": site(layout.attn_out),
            # resid_mid is *measured* (what the next sublayer reads), never computed as a sum, so
            # the test resid_mid == resid_pre + attn_out checks the names, not an identity
            f"blocks.{i}.hook_resid_mid": site(layout.resid_mid, patchable=False),
            f"blocks.{i}.mlp.hook_post": HookSite(block.mlp.down_proj, "input", 0),
            f"blocks.{i}.hook_mlp_out": site(layout.mlp_out),
            f"blocks.{i}.hook_resid_post": HookSite(block, "output", None),
        })
    return points


def hook_points(model: nn.Module) -> dict[str, HookSite]:
    """Every hookable name of ``model``, in forward order: its own ``hook_points()`` if it has one
    (the labkit GPT), else the adapter for its Hugging Face family."""
    if callable(getattr(model, "hook_points", None)):
        return model.hook_points()
    return hf_hook_points(model)


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


class _Handle:
    """Removes a torch hook and leaves the site's ``requires`` context (if any): one ``remove()``."""

    def __init__(self, handle, context: ContextManager | None):
        self.handle, self.context = handle, context

    def remove(self) -> None:
        self.handle.remove()
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


def _register(point: HookSite, name: str, fn: Callable) -> _Handle:
    """Attach ``fn(value) -> new value or None`` to the point; None leaves the model untouched."""
    def replace(old, new, index):
        """``old`` with the element at ``index`` (or all of it) replaced by ``new``, in its layout."""
        original = old if index is None else old[index]
        original = original[0] if isinstance(original, tuple) else original
        if point.unview is not None:
            new = point.unview(new)
        elif point.view is not None:
            new = new.reshape(original.shape)
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
            return args, {**kwargs, key: replace(kwargs[key], new, None)}
        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(module, args, output):
            new = fn(_get(point, args, {}, output, name))
            return None if new is None else replace(output, new, point.index)
        handle = point.module.register_forward_hook(hook)
    context = None
    if point.requires is not None:
        context = point.requires()
        context.__enter__()
    return _Handle(handle, context)


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
    ``value[:, :, h]``). Patterns and resid_mid are read-only on HF models: the model has
    already used them when the hook sees them; patch ``hook_z`` or ``hook_attn_out`` instead.
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


def forward_logits(model: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of either kind of model: HF (``model(input_ids=...).logits``)
    or one returning ``(logits, loss)`` like the labkit GPT. Inputs go to the model's device."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if callable(getattr(model, "hook_points", None)):
        out = model(input_ids, **forward_kwargs)
        return out[0] if isinstance(out, tuple) else out
    return model(input_ids=input_ids, **forward_kwargs).logits


@torch.no_grad()
def run_with_cache(model: nn.Module, input_ids: torch.Tensor, names_filter: NamesFilter = None,
                   **forward_kwargs) -> tuple[torch.Tensor, ActivationCache]:
    """One forward pass: ``(logits [B, T, vocab] on CPU, cache)``, for HF models and the labkit GPT."""
    with capture(model, names_filter) as cache:
        logits = forward_logits(model, input_ids, **forward_kwargs)
    return logits.detach().cpu(), cache


def n_hooks(model: nn.Module) -> int:
    """How many of labkit's forward (pre-)hooks are attached anywhere in ``model`` (0 when nothing
    leaked). Hooks that transformers installs itself (to record hidden states) are not counted."""
    return sum(getattr(fn, "__module__", None) == __name__
               for m in model.modules() for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
