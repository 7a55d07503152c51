"""LoRA written by hand: a frozen Linear plus a trainable low-rank update, injected by module name.

Fine-tuning all of W (out x in) costs out*in trainable numbers per layer and as many Adam
moments. LoRA (Hu et al. 2021) freezes W and learns the update as a product of two thin
matrices, so a layer computes

    y = x W^T + (alpha / r) * x A^T B^T          A: (r, in)   B: (out, r)   r << min(in, out)

and trains r*(in + out) numbers instead of out*in. B starts at zero, so the wrapped model
starts exactly equal to the base; A starts like nn.Linear's weight (Kaiming-uniform), as in
peft. After training, ``merge`` folds (alpha/r) B A into W: the merged model is a plain model
again, as fast as the base (tests: merged = unmerged outputs).

    >>> import torch; _ = torch.manual_seed(0)
    >>> layer = LoRALinear(torch.nn.Linear(576, 576, bias=False), r=8, alpha=16)
    >>> tuple(layer.A.shape), tuple(layer.B.shape), layer.scaling      # (r, in), (out, r), alpha / r
    ((8, 576), (576, 8), 2.0)
    >>> sum(p.numel() for p in layer.parameters() if p.requires_grad)   # 8 * (576 + 576)
    9216
    >>> x = torch.randn(2, 3, 576)
    >>> bool(torch.equal(layer(x), layer.base(x)))                      # B = 0: starts as the base
    True

On a whole model, ``add_lora`` wraps every Linear whose name ends in a target (HF names such as
``q_proj`` ... or the labkit GPT's ``attn.qkv``, ``attn.proj``, ``mlp.*``) and freezes all
else; SmolLM2 with r on q, k, v, o trains 115,200 * r numbers (tests)::

    model, tok = labkit.load_model()                     # or load_model(quantize="nf4"): QLoRA
    add_lora(model, r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    trainable_parameters(model)                          # (921600, 135436608)
    save_adapter(model, run_dir / "adapter.safetensors") # + adapter.json (config, sha256)
    load_adapter(fresh_model, run_dir / "adapter.safetensors")

The base may be a bitsandbytes ``Linear4bit`` (NF4) or ``Linear8bitLt``: it stays frozen and
quantized, only A and B (kept in fp32, as peft does by default) train. That is QLoRA
(Dettmers et al. 2023). ``keep_4bit_trainable`` (called by ``add_lora`` and ``load_model``) keeps
bitsandbytes' CPU inference repacking, which has no backward, away from a 4-bit base. tests/test_lora.py proves this module equals peft's LoRA: same outputs
and the same gradients on A and B.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch
from torch import nn

from .assets import sha256_of
from .runs import atomic_write

HF_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")       # Llama-family attention Linears
HF_MLP = ("gate_proj", "up_proj", "down_proj")
GPT_ATTENTION = ("attn.qkv", "attn.proj")                      # the labkit GPT's fused q,k,v and output
GPT_MLP = ("mlp.*",)                                           # fc/proj (GELU) or gate/up/down (SwiGLU)
ADAPTER_FORMAT = "labkit-lora/1"


class AdapterError(RuntimeError):
    """An adapter file that cannot be used: missing, damaged, or made for another model."""


# ----------------------------------------------------------------------------- the layer

def _is_quantized(base: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt keep packed integer weights (no float W to edit)."""
    weight = getattr(base, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * dropout(x) A^T B^T`` with ``base`` frozen; only A and B train."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear (or a bitsandbytes Linear4bit/8bitLt), "
                            f"got {type(base).__name__}")
        if int(r) != r or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.dropout_p = int(r), float(alpha), float(dropout)
        self.scaling = self.alpha / self.r       # peft's default (rsLoRA would use alpha / sqrt(r))
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        # fp32 even on a bf16 or 4-bit base: A and B are few, and peft upcasts them too by default.
        self.A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))   # (r, in)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))   # = nn.Linear's init = peft's: U(±1/sqrt(in))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # HF code and hooks sometimes read .weight / .bias of what they think is a Linear.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:          # W already holds W + (alpha/r) B A
            return y
        h = self.dropout(x.to(self.A.dtype)) @ self.A.T                   # (..., r)
        return y + (h @ self.B.T * self.scaling).to(y.dtype)             # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to W: (alpha / r) B A, shape (out, in), rank <= r."""
        return self.scaling * (self.B @ self.A)

    def _float_weight(self) -> torch.Tensor:
        if _is_quantized(self.base):
            raise ValueError(
                f"cannot merge LoRA into a quantized {type(self.base).__name__}: W + BA would have "
                f"to be re-quantized, which changes the model. Fix: keep the adapter unmerged on "
                f"the quantized base, or load the model without quantize= and merge there.")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha/r) B A; forward then skips the low-rank path (same outputs, base speed)."""
        if not self.merged:
            w = self._float_weight()
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W <- W - (alpha/r) B A), e.g. to keep training the adapter."""
        if self.merged:
            w = self._float_weight()
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"dropout={self.dropout_p:g}, merged={self.merged}")


# ----------------------------------------------------------------------------- on a model

def keep_4bit_trainable(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer on the path that has a backward pass; return their number.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight for a fused
    bf16 inference kernel the first time the layer runs in eval mode on an input without grad
    (any ``torch.no_grad()`` evaluation), and uses that kernel from then on, in training too. The
    kernel has no backward: gradients through the frozen base are silently wrong (measured on
    SmolLM2 after one evaluation: layer-0 LoRA gradients 1e-5 of the true ones, the last layer's
    off by 3x). It also computes in bf16, so an evaluation before training would not be comparable
    with one after. This turns the repacking off, so eval and training run the same dequantize
    + fp32 matmul on every CPU. A layer already repacked is refused: its layout cannot be trusted.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    packed = [m for m in layers if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise ValueError(
            f"{len(packed)} 4-bit layers were already repacked by bitsandbytes for its bf16 CPU inference "
            f"kernel (a no-grad forward in eval mode does that on CPUs with AVX512-BF16); that kernel has no "
            f"backward, so LoRA gradients through it would be silently wrong. Fix: load the model with "
            f"labkit.load_model(..., quantize='nf4') (which keeps the trainable layout), or call "
            f"labkit.lora.keep_4bit_trainable(model) right after loading, before any forward pass")
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def matches(name: str, target: str) -> bool:
    """Does module ``name`` match ``target``: the same name, a suffix at a dot, or a glob?

    >>> matches("model.layers.0.self_attn.q_proj", "q_proj"), matches("blocks.0.attn.qkv", "attn.qkv")
    (True, True)
    >>> matches("blocks.0.mlp.up", "mlp.*"), matches("model.layers.0.self_attn.xq_proj", "q_proj")
    (True, False)
    """
    return (name == target or name.endswith("." + target)
            or fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets=HF_ATTENTION, freeze: bool = True) -> list[str]:
    """Wrap every Linear whose name matches a target in a LoRALinear; return the wrapped names.

    ``freeze=True`` (the default, as peft) first freezes every parameter of the model, so the
    LoRA matrices are the only thing an optimizer over ``requires_grad`` parameters moves.
    Targets are suffixes (``"q_proj"``), full names or globs (``"mlp.*"``); ``"mlp.*"`` on the
    labkit GPT wraps its MLP Linears (with ``ffn="moe"``: the router and every expert's). A target that matches nothing is an error (a typo would
    otherwise train nothing).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    keep_4bit_trainable(model)      # a 4-bit base must stay on the path that has a backward (CPU)
    if freeze:
        model.requires_grad_(False)
    wrapped_already = lora_modules(model)
    chosen = []
    for name, module in model.named_modules():
        if not any(matches(name, t) for t in targets):
            continue
        if isinstance(module, LoRALinear) or any(name.startswith(w + ".") for w in wrapped_already):
            raise ValueError(f"{name} already carries LoRA. Fix: remove_lora(model) first, or load "
                             f"the base model again")
        if isinstance(module, nn.Linear):
            chosen.append(name)
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no Linear module matches targets {list(targets)}. This model's Linear "
                         f"layers end in: {', '.join(linear)} (labkit GPT: attn.qkv, attn.proj, mlp.*)")
    for name in chosen:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout))
    return chosen


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base Linears back (after folding the update into them if ``merge=True``)."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        _set_submodule(model, name, m.base)
    return model


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference at the base model's speed)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts its unpacked size (2 per byte).

    >>> trainable_parameters(nn.Linear(10, 4))
    (44, 44)
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # NF4 packs 2 weights per uint8
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------- save / load

def adapter_paths(path) -> tuple[Path, Path]:
    """``(tensors, config)``: ``x.safetensors`` and its ``x.json`` (a missing suffix is added).

    >>> [p.name for p in adapter_paths("runs/sft/adapter")]
    ['adapter.safetensors', 'adapter.json']
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def _free_name(path: Path) -> Path:
    n = 2
    while any(p.exists() for p in adapter_paths(path.with_name(f"{path.stem}-{n}{path.suffix}"))):
        n += 1
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def save_adapter(model: nn.Module, path, overwrite: bool = False, note: str = "") -> Path:
    """Write A and B of every LoRA layer to ``path`` (safetensors) and ``path.json`` (config + sha256).

    An existing adapter is never replaced unless ``overwrite=True``: the error names a free
    name. Both files are written atomically (temporary file, fsync, rename), tensors first,
    so a crash leaves either the old pair or a JSON that no longer matches (refused on load).
    """
    tensors_path, config_path = adapter_paths(path)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("this model has no LoRA layers to save. Fix: add_lora(model, ...) and train first")
    if not overwrite and (tensors_path.exists() or config_path.exists()):
        raise FileExistsError(f"{tensors_path} already exists; nothing was written. Fix: save under a "
                              f"new name (e.g. {_free_name(tensors_path)}) or pass overwrite=True")
    tensors, layers = {}, {}
    for name, m in modules.items():
        tensors[f"{name}.A"] = m.A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.B"] = m.B.detach().to("cpu", torch.float32).contiguous()
        layers[name] = {"r": m.r, "alpha": m.alpha, "dropout": m.dropout_p,
                        "in_features": m.in_features, "out_features": m.out_features}
    from safetensors.torch import save_file
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(tensors_path, lambda p: save_file(tensors, str(p), metadata={"format": ADAPTER_FORMAT}))
    config = {"format": ADAPTER_FORMAT, "tensors": tensors_path.name, "sha256": sha256_of(tensors_path),
              "base_model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
              "trainable_parameters": sum(t.numel() for t in tensors.values()),
              "note": note, "layers": layers}
    atomic_write(config_path, lambda p: p.write_text(json.dumps(config, indent=1)))
    return tensors_path


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a saved adapter, verified against its sha256; else AdapterError."""
    tensors_path, config_path = adapter_paths(path)
    fix = ("Fix: save the adapter again from the trained model (save_adapter(model, path, "
           "overwrite=True)) or point at another saved adapter")
    try:
        config = json.loads(config_path.read_text())
        if config.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"format {config.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    except (OSError, ValueError) as err:
        raise AdapterError(f"adapter config {config_path} is missing or unreadable ({err}). {fix}") from None
    if not tensors_path.is_file():
        raise AdapterError(f"adapter tensors {tensors_path} are missing. {fix}")
    digest = sha256_of(tensors_path)
    if digest != config["sha256"]:
        raise AdapterError(f"{tensors_path} is damaged or was replaced: sha256 {digest[:12]}…, its "
                           f"config says {config['sha256'][:12]}…; it was not loaded. {fix}")
    from safetensors.torch import load_file
    return config, load_file(str(tensors_path))


def load_adapter(model: nn.Module, path) -> list[str]:
    """Load a saved adapter into ``model`` (adding LoRA layers where it has none); return their names.

    Refused with AdapterError, before anything changes: a damaged file, a model without one
    of the adapter's layers, a layer of another shape, or existing LoRA layers of another rank.
    """
    config, tensors = read_adapter(path)
    layers = config["layers"]
    existing = lora_modules(model)
    names = dict(model.named_modules())
    base_hint = f" (the adapter was trained on {config['base_model']!r})" if config["base_model"] else ""
    for name, spec in layers.items():
        module = names.get(name)
        if module is None:
            raise AdapterError(f"the model has no layer {name}{base_hint}. Fix: load the base model "
                               f"the adapter was trained on")
        shape = (module.out_features, module.in_features) if hasattr(module, "in_features") else None
        if shape != (spec["out_features"], spec["in_features"]):
            raise AdapterError(f"layer {name} is {shape} here but {(spec['out_features'], spec['in_features'])} "
                               f"in the adapter{base_hint}. Fix: load the base model the adapter was trained on")
        if existing and (name not in existing or existing[name].r != spec["r"]):
            raise AdapterError(f"the model already carries LoRA layers that differ from the adapter's "
                               f"(layer {name}, r={spec['r']}). Fix: remove_lora(model) first, or load "
                               f"into a freshly loaded base model")
    if existing and set(existing) != set(layers):
        raise AdapterError(f"the model carries LoRA on {len(existing)} layers, the adapter on {len(layers)}. "
                           f"Fix: remove_lora(model) first, or load into a freshly loaded base model")
    if not existing:
        keep_4bit_trainable(model)
        model.requires_grad_(False)   # as add_lora: only the adapter trains from here on
    for name, spec in layers.items():
        if name not in existing:
            _set_submodule(model, name, LoRALinear(names[name], r=spec["r"], alpha=spec["alpha"],
                                                   dropout=spec["dropout"]))
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            was_merged = m.merged
            m.unmerge()
            m.A.copy_(tensors[f"{name}.A"])
            m.B.copy_(tensors[f"{name}.B"])
            if was_merged:
                m.merge()
    return list(layers)
