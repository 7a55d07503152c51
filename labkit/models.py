"""Load a pretrained causal LM + tokenizer: the embedded SmolLM2, a local directory, or a hub id.

    model, tok = load_model()                                 # embedded SmolLM2, offline
    model, tok = load_model("Qwen/Qwen2.5-0.5B")              # any hub id (needs hub access once)
    model, tok = load_model("Qwen/Qwen2.5-7B", quantize="nf4")  # 4-bit: fits a 16 GB GPU

Attention defaults to the ``eager`` implementation so ``output_attentions=True`` returns
the weights (SDPA never materialises them); pass ``attn_implementation="sdpa"`` for speed.
Weights load in fp32 on CPU: CPUs without native bf16 (AVX512-BF16 / AMX) emulate it 50-100x
slower, and even where it is native bf16 moves SmolLM2's logits by ~1 (notebook 00): far past
the 1e-3 to which the lab's equivalence checks hold.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .assets import asset_dir
from .runtime import pick_device

EMBEDDED_MODELS = {"smollm2-135m": "smollm2-135m"}  # lab name -> asset name
DEFAULT_MODEL = "smollm2-135m"
QUANTIZE_OPTIONS = (None, "nf4", "int8")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelUnavailableError(RuntimeError):
    """The model could not be found locally or fetched; the message says what to do."""


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Map a lab name, a local directory or a hub id to ``(path_or_id, is_local)``.

    >>> resolve_model_path("Qwen/Qwen2.5-0.5B")
    ('Qwen/Qwen2.5-0.5B', False)
    >>> resolve_model_path("gpt-7")
    Traceback (most recent call last):
    ...
    labkit.models.ModelUnavailableError: unknown model 'gpt-7': use an embedded model (smollm2-135m), a local directory with a config.json, or a hub id such as 'Qwen/Qwen2.5-0.5B'
    """
    if name in EMBEDDED_MODELS:
        return str(asset_dir(EMBEDDED_MODELS[name]) / "hf"), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"{path} is a directory but holds no config.json; point at a "
                                        f"folder written by save_pretrained()")
        return str(path), True
    if _HUB_ID.match(name) and not name.startswith(("./", "../")):
        return name, False
    raise ModelUnavailableError(
        f"unknown model {name!r}: use an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
        f"directory with a config.json, or a hub id such as 'Qwen/Qwen2.5-0.5B'")


def quantization_config(quantize: str | None, device: torch.device):
    """bitsandbytes config for ``"nf4"`` (4-bit NormalFloat) or ``"int8"`` (LLM.int8), else None."""
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError(f"quantize={quantize!r}: use one of {QUANTIZE_OPTIONS}")
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Compute in bf16 on a GPU (native there), in fp32 on CPU (bf16 is emulated on most CPUs).
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True)


def load_model(name: str = DEFAULT_MODEL, quantize: str | None = None, device: str | None = None,
               dtype: torch.dtype | None = None, attn_implementation: str = "eager"):
    """Return ``(model, tokenizer)`` in eval mode on the lab's device.

    ``name``: ``"smollm2-135m"`` (embedded, offline), a local directory, or any hub id
    (needs hub access or the HF cache). ``quantize``: None | ``"nf4"`` | ``"int8"``.
    ``dtype``: default fp32 on CPU/MPS, bf16 on CUDA. An NF4 model on CPU keeps bitsandbytes'
    dequantize + fp32 path in eval mode too (``labkit.lora.keep_4bit_trainable``): its bf16 CPU
    inference kernel has no backward, so a model evaluated once could no longer be fine-tuned.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    qconfig = quantization_config(quantize, dev)
    path, local = resolve_model_path(name)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": str(dev)})
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if local:  # a local load takes < 1 s: its progress bar is only noise in a notebook
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        if local:
            raise ModelUnavailableError(
                f"could not load {name!r} from {path}: {err}. If this is the embedded model, its "
                f"cache is damaged: `python -m labkit assets fetch {name}` rebuilds it") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelUnavailableError(
            f"could not load {name!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}: {str(err).splitlines()[0]}\n"
            f"Fix: check the id on huggingface.co; download it once where the hub is reachable "
            f"(`hf download {name}`, then it loads from the HF cache), pass a local directory, or "
            f"use the embedded {DEFAULT_MODEL!r} which needs no network.") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if qconfig is None:
        model.to(dev)
    elif quantize == "nf4" and dev.type == "cpu":
        from .lora import keep_4bit_trainable
        keep_4bit_trainable(model)   # the same fp32 path in eval and training (see its docstring)
    model.eval()
    if tokenizer.pad_token is None:  # batching needs one; Llama-family tokenizers often lack it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
