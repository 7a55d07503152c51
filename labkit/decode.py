"""Text out of a model: prefill the prompt, then one token at a time from the KV cache.

    model = GPT.from_hf(hf).prepare_for_decode()                  # SmolLM2 in labkit's GPT (see gpt.py)
    out = generate(model, tok, "To be, or not to be,", max_new_tokens=64)          # greedy
    out = generate(model, tok, ["Once upon a time", "The capital of France"], 64,  # a batch: left-padded
                   SamplingConfig(temperature=0.8, top_p=0.95), seed=0, stop=["\\n\\n"])
    out.texts[0], out.tokens[0], out.finish_reasons[0]         # text, new ids, "eos" | "stop" | "length"
    out.prefill_seconds, out.step_seconds                      # plot them: the prompt once, then per token
    for piece in stream(model, tok, "Once upon a time", 64):   # text as it is generated
        print(piece, end="")

The loop, for a batch of B prompts of different lengths:

  1. left-pad the prompts to the longest (pad_mask False on pads), so that every row's last
     prompt token sits in the same column and one (B, 1) token per step continues all of them;
  2. prefill: the whole padded batch through the model once, filling the cache; only the last
     position's logits are needed (``logits_to_keep=1``);
  3. repeat: choose each row's next token from its (B, vocab) logits (``labkit.sampling``: greedy
     or temperature / top-k / top-p / min-p / repetition penalty, drawn from a seeded generator),
     end a row at EOS, at a stop string in its text, or after ``max_new_tokens``; feed the (B, 1)
     new tokens back through the model, which reads everything earlier from the cache.

A finished row keeps being fed (its output is ignored, as in HF ``generate``) until every row has
finished. Timings are wall-clock seconds: ``prefill_seconds`` covers the prompt and the first
token, each entry of ``step_seconds`` one later token (forward pass + choosing it).

How fast, against what bound (benchmarks/decode_throughput.py, notebooks 14 and 15)::

    bounds = Bounds(weight_matrices(hf))          # SmolLM2's 211 weight matrices, copied
    bounds.measure()                               # memcpy GB/s; the weight-streaming floor, both layouts
    run = labkit_stack(model, ids, 128, fused=True)   # also hf_stack, ort_stack, llama_cpp_stack
    prefill_s, tokens_per_s = run()                # one timed generation
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .gpt import GPT, KVCache
from .sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0)


# ----------------------------------------------------------------------------- token ids -> text

class Detokenizer:
    """The text of a growing list of token ids, handed out piece by piece as it becomes final.

    ``"".join(pieces) == tokenizer.decode(ids)`` at every ``flush()``. Why not decode each token
    alone: a byte-level BPE token can carry part of a UTF-8 character (SmolLM2 spells 日 with three
    tokens), which decodes to U+FFFD until the rest arrives, and some tokenizers change a token's
    text by what follows it (spaces). So decode a short window of recent tokens and hand out only
    the text past what was already given, and only once it no longer ends in a broken character
    (the offsets scheme of vLLM's incremental detokenizer).

    >>> class Bytes:                                # a toy byte-level tokenizer: one byte per token
    ...     def decode(self, ids, skip_special_tokens=True): return bytes(ids).decode("utf-8", "replace")
    >>> d = Detokenizer(Bytes())
    >>> [d.push(b) for b in "né".encode()]           # é is two bytes: nothing until both arrived
    ['n', '', 'é']
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0     # the window decoded each time starts here (context for the new text)
        self.read_offset = 0       # text of ids[:read_offset] has been handed out

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became final (often one word piece, maybe '')."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""                                       # nothing new, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (a character cut off by the end of generation)."""
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(done):]


# ----------------------------------------------------------------------------- the result

@dataclass
class Generation:
    """What ``generate`` returns: per row, the new tokens and their text; per step, the time."""
    prompts: list[list[int]]             # each row's prompt ids, without padding
    tokens: list[list[int]]              # each row's new ids, up to and including the EOS or stop token
    texts: list[str] | None              # tokenizer.decode(tokens[row]) (None without a tokenizer)
    finish_reasons: list[str]            # "eos" | "stop" (a stop string) | "length" (max_new_tokens)
    prefill_seconds: float               # the whole prompt batch, up to the first new token
    step_seconds: list[float] = field(default_factory=list)   # each later token: forward + choice

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second per row after the first, i.e. the decode loop alone (batch 1: the
        number a chat user feels as typing speed; multiply by the batch size for throughput)."""
        return len(self.step_seconds) / sum(self.step_seconds) if self.step_seconds else float("nan")


# ----------------------------------------------------------------------------- the loop

def _as_id_lists(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], str)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: generate(model, tokenizer, prompts, ...); "
                             "or pass token ids (a list of lists, or a (B, T) tensor) with tokenizer=None")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [tokenizer(t).input_ids for t in texts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    ids = [list(map(int, p)) for p in prompts]
    if not ids or any(len(p) == 0 for p in ids):
        raise ValueError("every prompt needs at least one token (start it with the BOS token if it is empty)")
    return ids


def decode_steps(model: GPT, tokenizer, prompts, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 *, seed: int | None = None, generator: torch.Generator | None = None,
                 stop: Sequence[str] = (), eos_token_id: int | Sequence[int] | None | str = "auto",
                 fused: bool = False) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The decoding loop as a generator: after each new token it yields ``(next_ids (B,), pieces)``,
    ``pieces[row]`` being the text that row's token made final (``''`` for a finished row). Its
    ``return`` value (``StopIteration.value``) is the ``Generation``. ``generate`` and ``stream``
    are thin wrappers; the arguments are theirs."""
    sampling = GREEDY if sampling is None else sampling
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if stop and tokenizer is None:
        raise ValueError("stop strings are matched in the decoded text: pass the tokenizer")
    if eos_token_id == "auto":
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if fused and not model.has_fused_step:
        raise ValueError("fused=True needs a Llama-style GPT (rope, rmsnorm, swiglu, dense ffn, sdpa); "
                         "use fused=False for this one")

    # 1. left-pad: every row's last prompt token in the last column
    prompt_ids = _as_id_lists(tokenizer, prompts)
    B, P = len(prompt_ids), max(map(len, prompt_ids))
    device = next(model.parameters()).device
    ids = torch.zeros(B, P, dtype=torch.long)                                    # pads: id 0, never read
    pad_mask = torch.zeros(B, P, dtype=torch.bool)
    for row, p in enumerate(prompt_ids):
        ids[row, P - len(p):], pad_mask[row, P - len(p):] = torch.tensor(p), True
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    # what the repetition penalty looks at: prompt + new tokens, written in place (no re-allocation)
    history = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    history_mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
    history[:, :P], history_mask[:, :P] = ids, pad_mask
    cache = KVCache(model.cfg, B, max_len=P + max_new_tokens, device=device,
                    dtype=next(model.parameters()).dtype)

    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    detok = [Detokenizer(tokenizer) for _ in range(B)] if tokenizer is not None else None
    texts = [""] * B
    longest_stop = max(map(len, stop), default=0)

    def choose(logits: torch.Tensor, t: int) -> tuple[torch.Tensor, list[str]]:
        """(B, vocab) logits of step t -> (B,) next ids; updates every row's tokens, text and state."""
        nxt = sampling.next_token(logits, history=history[:, :P + t], history_mask=history_mask[:, :P + t],
                                  generator=generator)                          # (B,)
        history[:, P + t] = nxt
        pieces = [""] * B
        for row, token in enumerate(nxt.tolist()):
            if finish[row] is not None:
                continue
            new_tokens[row].append(token)
            if detok is not None:
                pieces[row] = detok[row].push(token)
                texts[row] += pieces[row]
            # a stop string completed by this token lies inside the new piece or straddles its start
            recent = texts[row][-(len(pieces[row]) + longest_stop - 1):] if stop and pieces[row] else ""
            if token in eos:
                finish[row] = "eos"
            elif any(s in recent for s in stop):
                finish[row] = "stop"
            elif t + 1 == max_new_tokens:
                finish[row] = "length"
            if finish[row] is not None and detok is not None:
                tail = detok[row].flush()
                pieces[row] += tail
                texts[row] += tail
        return nxt, pieces

    with torch.no_grad():
        # 2. prefill: the padded prompts at once; only the last position's logits are needed
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, pad_mask=pad_mask, logits_to_keep=1)[0][:, -1]   # (B, vocab)
        nxt, pieces = choose(logits, 0)
        prefill_seconds = time.perf_counter() - t0
        yield nxt, pieces
        # 3. one token per row per step, everything earlier from the cache
        step_seconds = []
        for t in range(1, max_new_tokens):
            if all(f is not None for f in finish):
                break
            t0 = time.perf_counter()
            nxt = nxt[:, None]                                                   # (B, 1)
            logits = model.decode_step(nxt, cache) if fused else model(nxt, cache=cache)[0][:, -1]
            nxt, pieces = choose(logits, t)
            step_seconds.append(time.perf_counter() - t0)
            yield nxt, pieces
    return Generation(prompt_ids, new_tokens, texts if detok is not None else None,
                      [f or "length" for f in finish], prefill_seconds, step_seconds)


def generate(model: GPT, tokenizer, prompts, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
             **kwargs) -> Generation:
    """Continue ``prompts`` (a string, a list of strings, or token ids with ``tokenizer=None``).

    ``sampling``: a ``SamplingConfig``; None = greedy. ``seed`` / ``generator``: where the draws
    come from (same seed, same text). ``stop``: strings that end a row once they appear in its new
    text (the token that completed one is kept, as HF does; cut the text at it if you like).
    ``eos_token_id``: "auto" = the tokenizer's; None = never stop early. ``fused``: decode with
    ``model.decode_step`` (faster; hook points do not run) instead of ``model(..., cache=...)``.

    >>> from labkit.gpt import GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, pos="rope")).eval()
    >>> out = generate(model, None, [[1, 2, 3], [4]], max_new_tokens=5, eos_token_id=None)
    >>> [len(t) for t in out.tokens], out.finish_reasons, len(out.step_seconds)
    ([5, 5], ['length', 'length'], 4)
    """
    steps = decode_steps(model, tokenizer, prompts, max_new_tokens, sampling, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def stream(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
           **kwargs) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is generated; the pieces join to
    ``generate(...).texts[0]`` exactly (same arguments, same seed). For a notebook:
    ``for piece in stream(model, tok, "Once upon a time", 64): print(piece, end="", flush=True)``."""
    if not isinstance(prompt, str):
        raise ValueError("stream takes one text prompt; for a batch or token ids use generate()")
    for _, pieces in decode_steps(model, tokenizer, prompt, max_new_tokens, sampling, **kwargs):
        if pieces[0]:
            yield pieces[0]


# ----------------------------------------------------------------------------- how fast: the bounds
# Decoding one token multiplies one row by every weight matrix once: it is bound by reading the
# weights from memory. Two bounds, measured on the model's own matrices (so the cache sizes are real):

def weight_matrices(hf_model) -> list[torch.Tensor]:
    """Every matrix a decode step of a Llama-style HF model multiplies, as it stores them: q, k, v,
    o, gate, up, down per layer, then lm_head (SmolLM2: 7 x 30 + 1 = 211)."""
    mats = []
    for layer in hf_model.model.layers:
        a, m = layer.self_attn, layer.mlp
        mats += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                 m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    return [w.detach() for w in mats + [hf_model.lm_head.weight]]


class Bounds:
    """memcpy bandwidth and the weight-streaming floor in both layouts, on copies of ``mats``.

    memcpy: copy a buffer as large as all the weights; (bytes read + written) / second. Nothing
    that reads each weight once per token decodes faster than bytes-of-weights / (that / 2).
    Floor: a 1-row input multiplied once by every matrix, nothing else, stored [out, in]
    (``F.linear``, nn.Linear's layout) or [in, out] (``x @ W``): the fastest fp32 decode torch's
    matmuls allow, before attention, norms or Python.

    >>> b = Bounds([torch.randn(32, 16), torch.randn(8, 32)])
    >>> b.nbytes, sorted(b.measure(repeats=1))
    (3072, ['floor_in_out_s', 'floor_out_in_s', 'memcpy_gbs'])
    """

    def __init__(self, mats: list[torch.Tensor]):
        self.out_in = [w.clone() for w in mats]                         # (out, in): F.linear(x, w)
        self.in_out = [w.t().contiguous() for w in mats]                # (in, out): x @ w
        self.nbytes = sum(w.numel() * w.element_size() for w in mats)
        self.x = {n: torch.randn(1, n) for n in {w.shape[1] for w in mats}}
        self.src = torch.empty(self.nbytes // 4)
        self.dst = torch.empty_like(self.src)

    def memcpy_gbs(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        return 2 * self.nbytes / (time.perf_counter() - t0) / 1e9      # read + written

    def floor_seconds(self, layout: str) -> float:
        t0 = time.perf_counter()
        if layout == "out_in":
            for w in self.out_in:
                F.linear(self.x[w.shape[1]], w)
        else:
            for w in self.in_out:
                self.x[w.shape[0]] @ w
        return time.perf_counter() - t0

    def measure(self, repeats: int = 3) -> dict:
        """Best of a few repeats each (the floor is a floor: the fastest pass is the one to beat)."""
        return {"memcpy_gbs": max(self.memcpy_gbs() for _ in range(repeats)),
                "floor_out_in_s": min(self.floor_seconds("out_in") for _ in range(repeats)),
                "floor_in_out_s": min(self.floor_seconds("in_out") for _ in range(repeats))}


# ----------------------------------------------------------------------------- how fast: the stacks
# Each ``*_stack`` builds what it needs once and returns ``run() -> (prefill seconds, decode tokens/s)``
# for one prompt and ``n_new`` greedy tokens (EOS ignored). Decode tokens/s = (n_new - 1) / (time of the
# last new token - time of the first): the per-token loop alone, the prefill reported on its own.

def hf_stack(model, ids: torch.Tensor, n_new: int, **generate_kwargs):
    """HF ``generate``, timed per token by a streamer; ``generate_kwargs`` e.g.
    ``cache_implementation="static"``."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):          # generate() calls put() with the prompt, then with each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run():
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, streamer=clock, pad_token_id=model.config.eos_token_id,
                           **generate_kwargs)
        new = clock.times[1:]
        return new[0] - t0, (len(new) - 1) / (new[-1] - new[0])
    return run


def labkit_stack(model: GPT, ids: torch.Tensor, n_new: int, fused: bool):
    """``generate`` on a labkit GPT (fp32 or quantized with ``labkit.quant.quantize_model``)."""
    def run():
        out = generate(model, None, ids, n_new, eos_token_id=None, fused=fused)
        assert len(out.tokens[0]) == n_new
        return out.prefill_seconds, out.decode_tokens_per_second
    return run


def ort_stack(path: Path, ids: list[int], n_new: int, threads: int):
    """onnxruntime-genai on a model directory made by ``onnx_model_dir``, with ``threads`` threads."""
    import onnxruntime_genai as og
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n_new, min_length=len(ids) + n_new, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        times = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        assert len(times) == n_new
        return times[0] - t0, (n_new - 1) / (times[-1] - times[0])
    return run


def llama_cpp_stack(gguf: Path, ids: list[int], n_new: int, threads: int):
    """llama.cpp (``llama-cpp-python``, optional) on a GGUF file."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + n_new + 8, n_batch=len(ids), n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def run():
        times = []
        t0 = time.perf_counter()
        for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())        # EOS is not checked here: exactly n_new tokens
            if len(times) == n_new:
                break
        return times[0] - t0, (n_new - 1) / (times[-1] - times[0])
    return run


def onnx_model_dir(hf_dir: Path, precision: str) -> Path:
    """Convert a cached HF checkpoint once (offline, ~30 s) with onnxruntime-genai's model builder into
    ``<cache>/onnx-genai/<asset>/<precision>`` (precision "fp32" or "int4"): next to the asset, not
    inside it (the asset store owns its directory). A finished conversion is reused."""
    hf_dir = Path(hf_dir)
    out = hf_dir.parent.parent / "onnx-genai" / hf_dir.parent.name / precision
    if (out / "genai_config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / precision
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(built),
               "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (built / "genai_config.json").exists():
            raise RuntimeError(f"the onnxruntime-genai model builder failed: {done.stderr.strip()[-300:]}")
        shutil.move(str(built), str(out))                   # complete, or not there at all
    return out
