"""Training throughput: labkit's GPT vs Hugging Face's LlamaForCausalLM, and MFU vs this machine's peak.

    python benchmarks/train_throughput.py             # or: make bench
    python benchmarks/train_throughput.py --rounds 9 --json build/bench.json

Both models have identical dimensions and architecture (RoPE, RMSNorm, SwiGLU, tied embeddings,
fp32): n_layer=4, n_head=4, n_embd=256, block 256, batch 8, vocab 4096 by default. Each round
times one full training step (forward, backward, AdamW) of each model, alternating, so a busy
neighbour slows both alike. The step is the one ``labkit.train.train`` takes for either model:
its optimizer (``make_optimizer``) and its loss (``lm_loss``: the GPT's own, the HF model's
cross-entropy on its logits). The script reports medians and spreads over rounds, and two ratios:

  labkit / HF tokens/s                       (target >= 1.0)
  MFU = achieved model FLOP/s / peak FLOP/s  (target >= 0.60), where the peak is the median
        fp32 matmul FLOP/s measured in this same run, on the same threads, and the model FLOPs
        per token are 6 * N + 12 * n_layer * T * n_embd (PaLM, appendix B: weights forward +
        backward, plus the attention score and value matmuls)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from labkit.gpt import GPT, GPTConfig
from labkit.runtime import choose_threads
from labkit.train import TrainConfig, lm_loss, make_optimizer


def matmul_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Median fp32 FLOP/s of a (size x size) @ (size x size) matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times)


def build_models(cfg: GPTConfig):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    ours = GPT(cfg)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    theirs = LlamaForCausalLM(hf_cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"the two models must be the same size: {n_ours} vs {n_theirs}"
    return ours, theirs, n_ours


def step_fn(model, x, y):
    opt = make_optimizer(model, TrainConfig(lr=1e-4))

    def step():
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="default: measured (labkit.runtime.choose_threads)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    threads = args.threads or choose_threads()[0]
    torch.set_num_threads(threads)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, pos="rope", norm="rmsnorm", act="swiglu", norm_eps=1e-6)
    ours, theirs, n_params = build_models(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.block), generator=g)
    y = torch.roll(x, -1, dims=1)                                   # next-token targets
    steps = {"labkit": step_fn(ours, x, y), "hf": step_fn(theirs, x, y)}
    for step in steps.values():         # warm-up: allocator, thread pool, first-call overheads
        step()
        step()
    times = {name: [] for name in steps}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(threads))
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.block
    flops_per_token = 6 * n_params + 12 * args.n_layer * args.block * args.n_embd
    peak = statistics.median(peaks)
    result = {"threads": threads, "params": n_params, "tokens_per_step": tokens,
              "flops_per_token": flops_per_token, "peak_gflops": peak / 1e9,
              "peak_gflops_range": [min(peaks) / 1e9, max(peaks) / 1e9]}
    for name, ts in times.items():
        tps = [tokens / t for t in ts]
        result[name] = {"tokens_per_sec": statistics.median(tps), "range": [min(tps), max(tps)],
                        "mfu": statistics.median(tps) * flops_per_token / peak}
    per_round = [h / o for o, h in zip(times["labkit"], times["hf"])]      # HF time / labkit time
    result["labkit_vs_hf"] = statistics.median(per_round)
    result["labkit_vs_hf_range"] = [min(per_round), max(per_round)]

    print(f"threads={threads}  params={n_params / 1e6:.2f}M  {tokens} tokens/step  "
          f"{flops_per_token / 1e6:.1f} MFLOP/token  (rounds={args.rounds}, medians, [min-max])")
    print(f"fp32 matmul peak (1024^3): {peak / 1e9:.1f} GFLOP/s [{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f}]")
    for name in steps:
        r = result[name]
        print(f"{name:>7}: {r['tokens_per_sec']:8.0f} tokens/s [{r['range'][0]:.0f}-{r['range'][1]:.0f}]  "
              f"MFU {100 * r['mfu']:.0f}% of the measured peak")
    print(f"labkit / HF tokens/s: {result['labkit_vs_hf']:.2f}x "
          f"[{result['labkit_vs_hf_range'][0]:.2f}-{result['labkit_vs_hf_range'][1]:.2f}]  (target >= 1.0)")
    print(f"labkit MFU: {100 * result['labkit']['mfu']:.0f}%  (target >= 60%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
