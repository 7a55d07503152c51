"""Decoding speed of SmolLM2-135M, batch 1: HF generate, the labkit decoder, onnxruntime-genai and
llama.cpp, against the bounds this machine sets for reading fp32 weights.

    python benchmarks/decode_throughput.py                  # or: make bench (after train_throughput.py)
    python benchmarks/decode_throughput.py --rounds 7 --json build/decode_bench.json
    python benchmarks/decode_throughput.py --tiny           # seconds: a tiny random Llama, no ORT / llama.cpp

What is timed: a 64-token prompt (Shakespeare), then 128 new tokens, greedy, EOS ignored. Decode
tokens/s = 127 / (time of the last new token - time of the first): the per-token loop alone; the
prefill (prompt -> first token) is reported on its own. Each round runs every stack once, in turn,
so a busy neighbour slows them alike; the table gives medians and [min-max] over rounds.

Decoding one token reads every weight once, so it is bound by memory, not arithmetic. Measured
in the same run, for the fp32 weights:
  memcpy bound     copying a buffer the size of the weights: (bytes read + written) / second,
                   divided by the bytes a token reads. Nothing that reads each weight once beats it.
  streaming floor  a 1-row input multiplied once by every weight matrix of SmolLM2 (q, k, v, o,
                   gate, up, down x 30 layers + lm_head), nothing else, with the weights stored
                   [out, in] (F.linear, nn.Linear's layout) and [in, out] (x @ W): the fastest
                   fp32 decode torch's matmuls allow, before any attention, norm or Python.
Targets (issue 12): labkit fp32 >= 1.3x HF eager tokens/s, and >= 85% of the best floor.

Stacks: HF generate (eager, sdpa attention); labkit fp32 through ``model(..., cache=)`` (modules
and hook points) and through ``decode_step`` (the fused step, same numbers); labkit int8 / int4
(``labkit.quant``, weight-only, fused step); onnxruntime-genai fp32 / int4 (converted once with its
model builder into ~/.cache/llm-lab/onnx-genai/); llama.cpp on the shipped Q4_1 GGUF
when ``llama_cpp`` is importable. A missing package gets one line saying so and how to add it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from labkit.decode import (Bounds, hf_stack, labkit_stack, llama_cpp_stack, onnx_model_dir, ort_stack,
                           weight_matrices)
from labkit.gpt import GPT
from labkit.quant import quantize_model
from labkit.runtime import choose_threads


# ----------------------------------------------------------------------------- building everything

def tiny_models():
    """A tiny random Llama and the same weights as HF eager / sdpa models (for --tiny: seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation="eager", eos_token_id=2)
    eager = LlamaForCausalLM(cfg).eval()
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    return eager, sdpa, None, None


def smollm2_models():
    import labkit
    from labkit.models import resolve_model_path
    eager, tok = labkit.load_model(attn_implementation="eager")
    sdpa, _ = labkit.load_model(attn_implementation="sdpa")
    return eager, sdpa, tok, Path(resolve_model_path("smollm2-135m")[0])


def build_stacks(args, threads: int):
    eager, sdpa, tok, hf_dir = tiny_models() if args.tiny else smollm2_models()
    if tok is None:
        ids = torch.randint(3, eager.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    else:
        import labkit
        text = labkit.load_shakespeare().val
        ids = tok(text[:20 * args.prompt_tokens], return_tensors="pt").input_ids[:, :args.prompt_tokens]
    n = args.new_tokens
    fp32 = GPT.from_hf(eager).prepare_for_decode()
    stacks, bytes_per_token, notes = {}, {}, []
    fp32_bytes = sum(w.numel() * w.element_size() for w in weight_matrices(eager))
    stacks["HF generate, eager"] = hf_stack(eager, ids, n)
    stacks["HF generate, sdpa"] = hf_stack(sdpa, ids, n)
    stacks["labkit fp32, modules"] = labkit_stack(fp32, ids, n, fused=False)
    stacks["labkit fp32, fused step"] = labkit_stack(fp32, ids, n, fused=True)
    for name in stacks:
        bytes_per_token[name] = fp32_bytes
    for bits in (8, 4):
        q = copy.deepcopy(fp32)
        report = quantize_model(q, bits=bits, group_size=32)
        name = f"labkit int{bits}, fused step"
        stacks[name] = labkit_stack(q, ids, n, fused=True)
        bytes_per_token[name] = report.bytes_after + q.lm_head.weight.numel() * 4     # lm_head (tied) stays fp32
        notes.append(f"labkit int{bits}: {report}")
    if args.tiny:
        notes.append("onnxruntime-genai, llama.cpp: skipped in --tiny mode (they run on SmolLM2 only)")
        return stacks, bytes_per_token, notes, Bounds(weight_matrices(eager)), fp32_bytes
    prompt = ids[0].tolist()
    try:
        import onnxruntime_genai  # noqa: F401
        for precision in ("fp32", "int4"):
            path = onnx_model_dir(hf_dir, precision)
            name = f"onnxruntime-genai {precision}"
            stacks[name] = ort_stack(path, prompt, n, threads)
            bytes_per_token[name] = (path / "model.onnx.data").stat().st_size           # file size: an upper bound
    except ImportError:
        notes.append("onnxruntime-genai: not installed (pip install onnxruntime-genai) - skipped")
    except RuntimeError as err:
        notes.append(f"onnxruntime-genai: {err} - skipped")
    ggufs = sorted(hf_dir.parent.glob("*.gguf"))
    try:
        import llama_cpp  # noqa: F401
        if not ggufs:
            notes.append(f"llama.cpp: no .gguf file in {hf_dir.parent} - skipped")
        else:
            stacks["llama.cpp Q4_1"] = llama_cpp_stack(ggufs[0], prompt, n, threads)
            bytes_per_token["llama.cpp Q4_1"] = ggufs[0].stat().st_size                 # file size: an upper bound
    except ImportError:
        notes.append("llama.cpp: llama-cpp-python not installed (optional; `pip install llama-cpp-python` "
                     "compiles it in ~5-10 min) - skipped")
    return stacks, bytes_per_token, notes, Bounds(weight_matrices(eager)), fp32_bytes


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="default: measured (labkit.runtime.choose_threads)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (tests)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2: decode speed is measured between the first and the last new token")

    threads = args.threads or choose_threads()[0]
    torch.set_num_threads(threads)
    stacks, bytes_per_token, notes, bounds, fp32_bytes = build_stacks(args, threads)
    for run in stacks.values():         # warm-up: first-call costs (allocations, thread pools, ORT sessions)
        run()
    results = {name: {"prefill_s": [], "tokens_per_s": []} for name in stacks}
    measured = []
    for _ in range(args.rounds):
        measured.append(bounds.measure())
        for name, run in stacks.items():
            prefill, tps = run()
            results[name]["prefill_s"].append(prefill)
            results[name]["tokens_per_s"].append(tps)

    # ---- summary: medians over rounds; ratios per round, then their median
    med = statistics.median
    memcpy_gbs = med(m["memcpy_gbs"] for m in measured)
    floors = {layout: med(m[f"floor_{layout}_s"] for m in measured) for layout in ("out_in", "in_out")}
    best_floor_s = min(floors.values())
    hf = results["HF generate, eager"]["tokens_per_s"]
    summary = {"threads": threads, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "model": "tiny random Llama" if args.tiny else "SmolLM2-135M",
               "fp32_weight_bytes": fp32_bytes, "memcpy_gbs": memcpy_gbs,
               "memcpy_bound_tokens_per_s": memcpy_gbs * 1e9 / fp32_bytes,
               "floor_seconds": floors, "floor_tokens_per_s": {k: 1 / v for k, v in floors.items()},
               "best_floor_tokens_per_s": 1 / best_floor_s, "notes": notes, "stacks": {}}
    for name, r in results.items():
        tps = r["tokens_per_s"]
        summary["stacks"][name] = {
            "tokens_per_s": med(tps), "range": [min(tps), max(tps)], "prefill_s": med(r["prefill_s"]),
            "vs_hf_eager": med(t / h for t, h in zip(tps, hf)),
            "vs_hf_eager_range": [min(t / h for t, h in zip(tps, hf)), max(t / h for t, h in zip(tps, hf))],
            "bytes_per_token": bytes_per_token[name], "fraction_of_floor": med(tps) * best_floor_s,
            "raw": r}

    # ---- the table
    mb = fp32_bytes / 1e6
    print(f"decode throughput: {summary['model']}, batch 1, {args.prompt_tokens}-token prompt + {args.new_tokens} "
          f"new tokens, greedy; threads={threads}; rounds={args.rounds} (medians [min-max])")
    print(f"bounds for the fp32 weights ({mb:.1f} MB read per token):")
    print(f"  memcpy: {memcpy_gbs:.1f} GB/s (read + written) -> {summary['memcpy_bound_tokens_per_s']:.1f} tokens/s")
    for layout, label in (("out_in", "[out, in], F.linear"), ("in_out", "[in, out], x @ W  ")):
        best = " (best)" if floors[layout] == best_floor_s else ""
        print(f"  weight-streaming floor, {label}: {1e3 * floors[layout]:7.2f} ms -> "
              f"{1 / floors[layout]:6.1f} tokens/s, {fp32_bytes / floors[layout] / 1e9:.1f} GB/s{best}")
    print(f"{'stack':<28} {'decode tokens/s':>22} {'prefill s':>10} {'x HF eager':>11} {'MB/token':>9} "
          f"{'of fp32 floor':>14}")
    for name, s in summary["stacks"].items():
        lo, hi = s["range"]
        print(f"{name:<28} {s['tokens_per_s']:8.1f} [{lo:6.1f}-{hi:6.1f}] {s['prefill_s']:10.3f} "
              f"{s['vs_hf_eager']:10.2f}x {s['bytes_per_token'] / 1e6:9.1f} {100 * s['fraction_of_floor']:13.0f}%")
    for note in notes:
        print(f"  note: {note}")
    for name in ("labkit fp32, fused step", "labkit fp32, modules"):
        s = summary["stacks"][name]
        lo, hi = s["vs_hf_eager_range"]
        print(f"target, {name}: {s['vs_hf_eager']:.2f}x HF eager tokens/s [{lo:.2f}-{hi:.2f}] (>= 1.3: "
              f"{'met' if s['vs_hf_eager'] >= 1.3 else 'missed'}); {100 * s['fraction_of_floor']:.0f}% of the "
              f"best floor (>= 85%: {'met' if s['fraction_of_floor'] >= 0.85 else 'missed'})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
