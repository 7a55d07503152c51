"""A GPT you can take apart: every modern component is one config switch away.

Read top to bottom: config -> positions -> norms -> KV cache -> attention -> MLP / MoE -> block -> model.
The defaults build a small GPT-2-style model; ``GPT.from_hf`` builds SmolLM2 (a Llama) and
reproduces Hugging Face's logits, which proves that the RoPE, RMSNorm, SwiGLU and grouped-query
attention below are the real ones::

    cfg = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)                                    # GPT-2 style: learned positions, LayerNorm, GELU
    model = GPT(replace(cfg, pos="rope", norm="rmsnorm", act="swiglu", n_kv_head=2))  # Llama style
    logits, loss = model(idx, targets)                  # idx, targets: (B, T) int64

Decoding one token at a time reuses every earlier token's keys and values (notebook 06)::

    cache = KVCache(model.cfg, batch_size=1, max_len=256)
    logits, _ = model(prompt, cache=cache)              # prefill: the whole prompt at once
    logits, _ = model(next_token, cache=cache)          # decode: one new token, the rest from the cache

Hook points carry TransformerLens names (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_pattern``
...; the table is in ``labkit.hooks``): identity modules that ``labkit.hooks.capture`` / ``patch``
read and edit by name. SDPA never materialises the attention pattern, so a layer computes the
written-out attention while its pattern or scores are hooked (``Attention.written_out``,
entered by ``labkit.hooks``) and SDPA otherwise; both paths give the same output (tests).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import HookPoint, HookSite

OPTIONS = {"pos": ("learned", "sinusoidal", "rope", "alibi", "none"),
           "norm": ("layernorm", "rmsnorm", "none"),
           "act": ("gelu", "relu", "swiglu"),
           "ffn": ("dense", "moe", "none"),
           "attn_impl": ("sdpa", "manual")}


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256            # training context; learned positions have this many rows
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None     # None: = n_head (MHA); 1: MQA; a divisor of n_head: GQA
    n_embd: int = 128
    d_ff: int | None = None          # None: 4*n_embd, or for swiglu 8/3*n_embd rounded up to 32
    pos: str = "learned"             # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    norm: str = "layernorm"          # layernorm | rmsnorm | none (none: only to break things)
    norm_eps: float = 1e-5
    act: str = "gelu"                # gelu | relu | swiglu
    window: int | None = None        # sliding window: a token sees itself and window-1 earlier ones
    ffn: str = "dense"               # dense | moe | none
    n_experts: int = 4               # moe only
    top_k: int = 2                   # moe only: experts per token
    residual: bool = True            # False: only to break things (notebook 04)
    tie_embeddings: bool = True      # lm_head shares the token embedding (GPT-2, SmolLM2)
    bias: bool = False               # every Linear and LayerNorm (GPT-2 had them)
    qkv_bias: bool | None = None     # None: = bias. Qwen2 has biases on q, k, v only
    dropout: float = 0.0
    attn_impl: str = "sdpa"          # sdpa (fast) | manual (the formula, written out)

    def __post_init__(self):
        for field, allowed in OPTIONS.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: use one of {allowed}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and n_head "
                             f"by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE rotates pairs of dimensions: the head size must be even")
        if self.ffn == "moe" and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window}: a token must see at least itself (window >= 1)")
        if self.d_ff is None:
            self.d_ff = 4 * self.n_embd if self.act != "swiglu" else 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ----------------------------------------------------------------------------- positions

def sinusoidal_table(T: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T, dim) table of Vaswani et al.: even dims sin(pos / base^(i/dim)), odd dims cos(...)."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]                        # (T, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)   # (dim/2,)
    table = torch.zeros(T, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def rope_cos_sin(T: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, head_dim) cos and sin for RoPE in Llama's layout: frequencies repeated in two halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq              # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                       # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + hd/2) pair of x (B, nh, T, hd) by the angle of its position.

    q·k then depends on positions only through their difference: relative position for free.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes 2^(-8/n), 2^(-16/n), ... (Press et al. 2022; exact for powers of two)."""
    return torch.tensor([2 ** (-8 * (h + 1) / n_head) for h in range(n_head)])


# ----------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """x / rms(x) * weight, in fp32 like Llama (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:   # the same numbers in one op instead of eight
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.Identity()


# ----------------------------------------------------------------------------- KV cache

@dataclass
class CacheStep:
    """What one forward pass through a ``KVCache`` needs, computed once for every layer."""
    positions: torch.Tensor       # (B, T) absolute position of each new token; -1 for padding
    allowed: torch.Tensor         # (B, 1, T, K) bool: new token t may read key slot k
    key_positions: torch.Tensor   # (B, K) position held by each key slot the layers will read
    write: slice | torch.Tensor   # which buffer slots the new keys and values go to
    concat: bool                  # True: attend over (buffer, new keys), then write (a ring buffer's prefill)
    n_write: int                  # how many of the new tokens are stored (the last n_write)
    reads_all: bool = False       # every new token may read every key slot: attention needs no mask


class KVCache:
    """Every layer's keys and values for the tokens seen so far, allocated once.

    ``k`` and ``v`` are (n_layer, B, n_kv_head, S, head_dim): only the key/value heads are stored,
    so with GQA the cache is n_head / n_kv_head times smaller than if every query head kept its
    own (SmolLM2: 3 of 9). S = ``max_len``, or ``window`` for a sliding window: then the buffer
    is a ring and token number t (counted from the first prefill) lives in slot t % window, so
    memory stays constant however long the text grows, and only the last ``window`` positions
    can be read. Keys are stored *after* RoPE: a cached key never needs rotating again.

    A batch of prompts of different lengths is left-padded: ``pad_mask`` (B, T) marks real
    tokens, pads take no position (row b's first real token is position 0) and are never read.

    >>> cfg = GPTConfig(vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, pos="rope")
    >>> cache = KVCache(cfg, batch_size=1, max_len=8)
    >>> tuple(cache.k.shape), cache.bytes_per_token     # 2 (k, v) x 2 layers x 2 heads x 4 dims x 4 bytes
    ((2, 1, 2, 8, 4), 128)
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, window: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        if window is not None and window < 1:
            raise ValueError(f"window={window}: keep at least one position")
        self.cfg, self.batch_size, self.window = cfg, batch_size, window
        self.max_len = max_len
        slots = window if window is not None else max_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, slots, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)   # per-layer views, made once
        self.slot_pos = torch.full((batch_size, slots), -1, dtype=torch.long, device=device)   # -1: empty
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's next position
        self.length = 0                                                            # tokens fed (pads too)

    @property
    def bytes_per_token(self) -> int:
        """2 (keys and values) x n_layer x n_kv_head x head_dim x bytes per number."""
        return 2 * self.cfg.n_layer * self.cfg.n_kv_head * self.cfg.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_pos.zero_()
        self.length = 0

    def advance(self, T: int, pad_mask: torch.Tensor | None = None) -> CacheStep:
        """Account for T new tokens: their positions, the slots they take, the mask every layer uses."""
        B, device = self.batch_size, self.slot_pos.device
        real = (torch.ones(B, T, dtype=torch.bool, device=device) if pad_mask is None
                else pad_mask.to(device=device, dtype=torch.bool))
        if real.shape != (B, T):
            raise ValueError(f"pad_mask has shape {tuple(real.shape)}, expected (batch, new tokens) = {(B, T)}")
        positions = (self.next_pos[:, None] + real.long().cumsum(1) - 1).masked_fill(~real, -1)   # (B, T)
        S, t0 = self.slot_pos.shape[1], self.length
        if self.window is None and t0 + T > S:
            raise ValueError(f"KV cache full: {t0} + {T} tokens > max_len={S}; build KVCache with a larger "
                             f"max_len (or a window= for a ring buffer)")
        if t0 + T <= S:                     # fits without wrapping: write, then read slots [0, t0 + T)
            write, concat, n_write = slice(t0, t0 + T), False, T
            self.slot_pos[:, write] = positions
            key_positions = self.slot_pos[:, :t0 + T]
        elif T == 1:                        # ring buffer, one token: it replaces the oldest slot
            write, concat, n_write = slice(t0 % S, t0 % S + 1), False, 1
            self.slot_pos[:, write] = positions
            key_positions = self.slot_pos
        else:                               # ring buffer, a chunk: read (old slots, new keys), keep the last S
            n_write = min(T, S)
            write, concat = torch.arange(t0 + T - n_write, t0 + T, device=device) % S, True
            key_positions = torch.cat([self.slot_pos, positions], dim=1)
            self.slot_pos[:, write] = positions[:, T - n_write:]
        windows = [w for w in (self.cfg.window, self.window) if w is not None]
        q, k = positions[:, :, None], key_positions[:, None, :]                  # (B, T, 1), (B, 1, K)
        allowed = (k >= 0) & (k <= q)
        if windows:
            allowed &= (q - k) < min(windows)
        allowed |= ~allowed.any(-1, keepdim=True)    # a pad query reads something: finite, never used
        self.length += T
        self.next_pos += real.sum(1)
        # one check here spares every layer a mask: decoding one token with no pads and no window cut
        reads_all = T == 1 and bool(allowed.all())
        return CacheStep(positions, allowed[:, None], key_positions, write, concat, n_write, reads_all)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep):
        """Put this layer's new keys/values (B, nkv, T, hd) in place; return what attention reads (B, nkv, K, hd)."""
        ks, vs = self.k_layers[layer], self.v_layers[layer]                  # (B, nkv, S, hd)
        if step.concat:
            k_all, v_all = torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)
            ks[:, :, step.write], vs[:, :, step.write] = k[:, :, -step.n_write:], v[:, :, -step.n_write:]
            return k_all, v_all
        start, K = step.write.start, step.key_positions.shape[1]
        ks.narrow(2, start, step.n_write).copy_(k)                          # in place: no new buffer
        vs.narrow(2, start, step.n_write).copy_(v)
        return ks.narrow(2, 0, K), vs.narrow(2, 0, K)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # one matmul for q, k and v; with GQA k and v have fewer heads than q
        self.qkv = nn.Linear(cfg.n_embd, (nh + 2 * nkv) * hd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(nh * hd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())
        if cfg.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(nh), persistent=False)
        self._written_out = 0     # > 0 while someone reads the pattern: the manual path runs

    @contextlib.contextmanager
    def written_out(self):
        """Inside the block, compute attention with the formula written out (so scores and pattern
        exist to be hooked), whatever ``cfg.attn_impl`` says. ``labkit.hooks`` enters it for you."""
        self._written_out += 1
        try:
            yield self
        finally:
            self._written_out -= 1

    def mask(self, T: int, device) -> torch.Tensor:
        """(T, T) bool, True where query i may read key j: j <= i, and i - j < window."""
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        allowed = j <= i
        if self.cfg.window is not None:
            allowed &= (i - j) < self.cfg.window
        return allowed

    def forward(self, x, rope=None, attn_mask=None, kv: tuple[KVCache, CacheStep] | None = None):
        """x (B, T, C) -> (B, T, C). ``rope``: cos/sin broadcastable to (B, nh, T, hd); ``attn_mask``:
        (T, K) or (B, 1, T, K) bool, None = causal (+ window); ``kv``: (cache, step) when decoding."""
        B, T, C = x.shape
        cfg, nh, nkv, hd = self.cfg, self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        # one matmul, then q, k, v as views in the hooks' layout [B, T, heads, hd] (TransformerLens's)
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, hd)
        q0, k0, v = qkv.split([nh, nkv, nkv], dim=2)
        q, k, v = self.hook_q(q0), self.hook_k(k0), self.hook_v(v)
        if rope is not None:   # rotate in that layout too: cos/sin (T, hd) or (B, 1, T, hd) -> (.., T, 1, hd)
            cos, sin = (t.unsqueeze(-2) if t.dim() == 2 else t.transpose(-3, -2) for t in rope)
            if q is q0 and k is k0:   # no hook replaced them: rotate q and k as one tensor (half the ops)
                q, k = apply_rope(qkv[:, :, :nh + nkv], cos, sin).split([nh, nkv], dim=2)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # (B, heads, T, hd)
        full = False           # True: every query may read every key (one new token, nothing cut): no mask
        if kv is not None:     # keys and values of earlier tokens come from the cache
            cache, step = kv
            k, v = cache.store(self.layer, k, v, step)                # (B, nkv, K, hd)
            attn_mask, q_pos, k_pos, full = step.allowed, step.positions, step.key_positions, step.reads_all
        else:
            q_pos = k_pos = torch.arange(T, device=x.device)
        K = k.shape[2]
        bias = None
        if cfg.pos == "alibi":  # penalty grows linearly with distance, a different slope per head
            dist = (q_pos[..., :, None] - k_pos[..., None, :]).clamp(min=0)          # (T, K) or (B, T, K)
            bias = -self.slopes.view(nh, 1, 1) * (dist if dist.dim() == 2 else dist[:, None])
        p_drop = self.dropout if self.training else 0.0
        if cfg.attn_impl == "manual" or self._written_out:
            allowed = self.mask(T, x.device) if attn_mask is None else attn_mask    # (T, K) or (B, 1, T, K)
            if nkv < nh:  # GQA: query head h reads KV head h // (nh / nkv)
                k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)           # (B, nh, T, K)
            if bias is not None:
                att = att + bias
            att = self.hook_attn_scores(att.masked_fill(~allowed, float("-inf")))
            att = self.hook_pattern(att.softmax(dim=-1))
            y = F.dropout(att, p_drop, self.training) @ v             # (B, nh, T, hd)
        elif bias is None and (full or (cfg.window is None and attn_mask is None and T == K)):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=not full, dropout_p=p_drop, enable_gqa=nkv < nh)
        else:
            allowed = self.mask(T, x.device) if attn_mask is None else attn_mask
            mask = allowed if bias is None else torch.zeros(allowed.shape, device=x.device).masked_fill(
                ~allowed, float("-inf")) + bias
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, enable_gqa=nkv < nh)
        z = self.hook_z(y.transpose(1, 2))                            # (B, T, nh, hd): each head's output
        return self.proj(z.reshape(B, T, nh * hd))                    # heads side by side, then mixed


# ----------------------------------------------------------------------------- MLP and MoE

class MLP(nn.Module):
    """fc -> act -> proj, or SwiGLU: down(silu(gate(x)) * up(x)) as in Llama."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.act == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
            self.up = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
            self.down = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
            self.act = nn.GELU() if cfg.act == "gelu" else nn.ReLU()
            self.proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.hook_post = HookPoint()      # (..., d_ff) hidden activations: where ReLUs die
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            out = self.down(self.hook_post(F.silu(self.gate(x)) * self.up(x)))
        else:
            out = self.proj(self.hook_post(self.act(self.fc(x))))
        return self.drop(out) if self.drop.p else out


class MoE(nn.Module):
    """Top-k mixture of experts with the Switch-Transformer load-balancing loss.

    Each token goes to its top_k experts, weighted by the router's softmax renormalised over
    those k. ``aux_loss`` = n_experts * sum_e f_e * P_e, where f_e is the fraction of
    assignments routed to expert e and P_e its mean router probability: 1.0 when balanced,
    up to n_experts when every token goes to one expert. ``counts`` is the last batch's
    assignments per expert (utilisation).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.tensor(0.0)
        self.counts = torch.zeros(cfg.n_experts)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                        # (N, C), N = B*T
        probs = self.router(flat).softmax(dim=-1)                      # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)               # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)         # tokens routed to e
            if token.numel():
                out.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).float()
        self.counts = counts.detach()
        self.aux_loss = len(self.experts) * (counts / chosen.numel() * probs.mean(dim=0)).sum()
        return out.view(B, T, C)


# ----------------------------------------------------------------------------- block and model

class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with the residual stream hooked."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.residual = cfg.residual
        self.ln_1, self.ln_2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = {"dense": MLP, "moe": MoE}[cfg.ffn](cfg) if cfg.ffn != "none" else None
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, rope=None, attn_mask=None, kv=None):
        x = self.hook_resid_pre(x)                                     # (B, T, C)
        h = self.ln_1(x)
        attn_out = self.hook_attn_out(self.attn(h, rope, attn_mask) if kv is None else
                                      self.attn(h, rope, attn_mask, kv=kv))
        x = self.hook_resid_mid(x + attn_out if self.residual else attn_out)
        if self.mlp is not None:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln_2(x)))
            x = x + mlp_out if self.residual else mlp_out
        return self.hook_resid_post(x)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()     # token embeddings
        self.hook_pos_embed = HookPoint() # absolute position vectors (learned / sinusoidal only)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink what each layer adds to the residual
            if name.endswith(("proj.weight", "down.weight")):   # attn.proj, mlp.proj / mlp.down, experts'
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embedding tables (Kaplan et al.'s N): the token
        embedding, the unembedding when it is a separate matrix, and learned positions.

        >>> tied = GPT(GPTConfig(vocab_size=100, n_layer=1, n_embd=32, n_head=2))
        >>> untied = GPT(GPTConfig(vocab_size=100, n_layer=1, n_embd=32, n_head=2, tie_embeddings=False))
        >>> tied.num_params() == untied.num_params(), untied.num_params(False) - tied.num_params(False)
        (True, 3200)
        """
        n = sum(p.numel() for p in self.parameters())   # a tied matrix is counted once
        if non_embedding:
            n -= self.wte.weight.numel()
            n -= self.lm_head.weight.numel() if not self.cfg.tie_embeddings else 0
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    def forward(self, idx, targets=None, attn_mask=None, *, cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None, logits_to_keep: int = 0):
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over targets != -100.

        ``attn_mask`` (T, T) or (B, 1, T, T) bool, True where query i may read key j, replaces
        the causal (and window) mask: all True for a bidirectional encoder (masked LM), or
        bidirectional over a prefix and causal after it (prefix LM, notebook 11).
        ``cache``: a ``KVCache``; the new tokens ``idx`` continue what it holds (decoding).
        ``pad_mask`` (B, T) bool, with a cache: False marks left padding.
        ``logits_to_keep``: 0 = logits for every position; n = only the last n (HF's argument): a
        prefill needs only the last, and skips the (T, vocab) matmul for the others.
        """
        B, T = idx.shape
        cfg = self.cfg
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep with targets: the loss needs the logits of every position")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) for vocab_size={cfg.vocab_size}, got "
                             f"min {int(idx.min())}, max {int(idx.max())}: encode with this model's tokenizer "
                             f"(or build GPTConfig(vocab_size=...) from tokenizer.vocab_size)")
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask and cache cannot be combined: the cache builds its own mask")
            step = cache.advance(T, pad_mask)
            positions = step.positions.clamp(min=0)                                    # (B, T)
        elif pad_mask is not None:
            raise ValueError("pad_mask is for cached decoding of a left-padded batch: pass cache=KVCache(...)")
        else:
            step, positions = None, torch.arange(T, device=idx.device)                 # (T,)
        if cfg.pos == "learned" and int(positions.max()) >= cfg.block_size:
            raise ValueError(f"position {int(positions.max())} exceeds block_size={cfg.block_size}: learned "
                             f"positions have no row for it (rope, alibi, sinusoidal and none do)")
        x = self.hook_embed(self.wte(idx))                             # (B, T, C)
        if cfg.pos == "learned":
            x = x + self.hook_pos_embed(self.wpe(positions).expand(B, T, -1))
        elif cfg.pos == "sinusoidal":
            table = sinusoidal_table(int(positions.max()) + 1, cfg.n_embd).to(x.device)
            x = x + self.hook_pos_embed(table[positions].expand(B, T, -1))
        rope = None
        if cfg.pos == "rope":
            cos, sin = self._rope(int(positions.max()) + 1, x.device)                  # (T_max, hd)
            rope = (cos[:T], sin[:T]) if step is None else (cos[positions][:, None], sin[positions][:, None])
        x = self.drop(x) if self.drop.p else x
        kv = None if cache is None else (cache, step)
        for block in self.blocks:
            x = block(x, rope, attn_mask, kv)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]                                 # (B, logits_to_keep, C)
        logits = self.lm_head(self.ln_f(x))                            # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @property
    def has_fused_step(self) -> bool:
        """Whether ``decode_step`` covers this configuration (Llama style: RoPE, RMSNorm, SwiGLU)."""
        c = self.cfg
        return (c.pos, c.norm, c.act, c.ffn, c.attn_impl, c.residual) == ("rope", "rmsnorm", "swiglu", "dense",
                                                                         "sdpa", True)

    @torch.no_grad()
    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """(B, 1) new tokens -> (B, vocab) next-token logits: ``forward(idx, cache=cache)`` for one token,
        written as one function. Same math, same numbers (tests/test_decode.py), fewer steps between them:
        no hook point, block, attention or MLP is called as a module (their hooks do not run; the
        Linear and norm layers are, so quantized layers work), RoPE rotates q and k together, and
        attention takes no mask when every cached key is readable. At batch 1 a step is ~1,000 small
        ops around the weight matmuls, each costing microseconds of Python and dispatch: this path
        measured 10 points closer to the weight-streaming floor than ``forward`` (README, decoding).
        """
        if not self.has_fused_step:
            raise ValueError("decode_step covers Llama-style configs (rope, rmsnorm, swiglu, dense, sdpa); "
                             "call model(idx, cache=cache) for this one")
        B, T = idx.shape
        if T != 1:
            raise ValueError(f"decode_step takes one new token per row, got idx of shape {tuple(idx.shape)}: "
                             f"prefill with model(prompt, cache=cache)")
        nh, nkv, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        step = cache.advance(1)
        pos = step.positions.clamp(min=0)                                        # (B, 1)
        cos, sin = self._rope(int(pos.max()) + 1, idx.device)
        cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]                    # (B, 1, 1, hd)
        mask = None if step.reads_all else step.allowed                          # (B, 1, 1, K)
        x = self.wte(idx)                                                        # (B, 1, C)
        for layer, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            qkv = attn.qkv(block.ln_1(x)).view(B, 1, nh + 2 * nkv, hd)           # (B, 1, heads, hd)
            q, k = apply_rope(qkv[:, :, :nh + nkv], cos, sin).transpose(1, 2).split([nh, nkv], dim=1)
            k, v = cache.store(layer, k, qkv[:, :, nh + nkv:].transpose(1, 2), step)   # (B, nkv, K, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv < nh)   # (B, nh, 1, hd)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, 1, nh * hd))
            h = block.ln_2(x)
            x = x + mlp.down(F.silu(mlp.gate(h)) * mlp.up(h))
        return self.lm_head(self.ln_f(x))[:, -1]                                 # (B, vocab)

    @torch.no_grad()
    def prepare_for_decode(self, layout: str = "in_out") -> "GPT":
        """Re-lay every nn.Linear weight in memory as [in, out] (``layout="out_in"`` undoes it); returns self.

        Shapes, names, values and the state dict stay the same: only the strides change, so
        ``F.linear(x, w)`` = ``x @ w.T`` reads w.T as a contiguous [in, out] matrix. Decoding one
        token multiplies a single row by every weight once, and that product is bound by reading
        the weights; MKL streamed SmolLM2's matrices faster in this layout (benchmarks/
        decode_throughput.py measures both layouts as its floor). A tied lm_head / embedding stays
        one tensor. Copies each weight once (peak memory + the largest matrix); for inference:
        training works but was not tuned for this layout.

        >>> m = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8)).prepare_for_decode()
        >>> m.lm_head.weight.shape, m.lm_head.weight.stride(), m.lm_head.weight is m.wte.weight
        (torch.Size([11, 8]), (1, 11), True)
        """
        if layout not in ("in_out", "out_in"):
            raise ValueError(f"layout={layout!r}: use 'in_out' (decoding) or 'out_in' (nn.Linear's default)")
        relaid = {}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in relaid:
                w = module.weight
                data = w.t().contiguous().t() if layout == "in_out" else w.contiguous()   # (out, in) either way
                relaid[id(w)] = nn.Parameter(data, requires_grad=w.requires_grad)
        for module in self.modules():     # every module holding one of them (a tied embedding too)
            if isinstance(getattr(module, "weight", None), nn.Parameter) and id(module.weight) in relaid:
                module.weight = relaid[id(module.weight)]
        return self

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos/sin tables for positions 0..T-1, reused while the tables cover T and device and
        theta stay the same (notebook 02 edits ``cfg.rope_theta`` on a trained model)."""
        key = (device, self.cfg.head_dim, self.cfg.rope_theta)
        if getattr(self, "_rope_key", None) != key or self._rope_tables[0].shape[0] < T:
            size = max(T, self.cfg.block_size)
            self._rope_tables = tuple(t.to(device) for t in rope_cos_sin(size, self.cfg.head_dim, self.cfg.rope_theta))
            self._rope_key = key
        return self._rope_tables

    def hook_points(self) -> dict[str, HookSite]:
        """Every HookPoint by its module path (the protocol of ``labkit.hooks``). The pattern and
        the scores exist only on the written-out path: hooking them switches that layer to it."""
        points = {}
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
                needs_formula = name.endswith(("hook_pattern", "hook_attn_scores"))
                points[name] = HookSite(mod, "output", requires=owner.written_out if needs_formula else None)
        if self.wpe is None and self.cfg.pos != "sinusoidal":
            del points["hook_pos_embed"]                               # no absolute positions to hook
        if self.cfg.pos != "rope":
            points = {n: p for n, p in points.items() if not n.endswith(("hook_rot_q", "hook_rot_k"))}
        return points

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward pass (0 without MoE)."""
        return sum((b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoE)), torch.tensor(0.0))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Sample (temperature > 0) or take the argmax (temperature == 0), no KV cache (see 06)."""
        for _ in range(max_new_tokens):
            ctx = idx if self.cfg.pos != "learned" else idx[:, -self.cfg.block_size:]
            logits = self(ctx)[0][:, -1, :]                            # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    @classmethod
    def from_run(cls, path) -> "GPT":
        """The GPT a ``labkit.train`` run saved, rebuilt from its directory: the config from
        ``config.json``, the weights from the latest checkpoint (its sha256 checked first, so a
        damaged file raises ``CheckpointError`` naming the fix instead of loading). In eval mode.

        >>> import tempfile
        >>> from labkit.runs import Run
        >>> run = Run.create(tempfile.mkdtemp(), "tiny")
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
        >>> run.write_config(model_config=model.cfg, model_class="GPT")
        >>> _ = run.save_checkpoint(0, model, torch.optim.AdamW(model.parameters()), torch.Generator(), {})
        >>> again = GPT.from_run(run.path)
        >>> again.cfg == model.cfg, all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
        (True, True)
        """
        from .runs import CheckpointError, Run, load_checkpoint, restore_model
        run = Run(path)
        if not (run.path / "config.json").is_file():
            raise CheckpointError(f"{run.path} has no config.json: it is not a run directory written by "
                                  f"labkit.train.train(..., run=...)")
        config = run.read_config()
        if config.get("model_class") != "GPT" or not isinstance(config.get("model_config"), dict):
            raise CheckpointError(f"run {run.path} trained a {config.get('model_class')!r}, not a labkit GPT: "
                                  f"rebuild that model class from its config.json instead")
        model = cls(GPTConfig(**config["model_config"]))
        tensors, _ = load_checkpoint(run.path)
        restore_model(model, tensors)
        return model.eval()

    @classmethod
    def from_hf(cls, hf_model) -> "GPT":
        """Copy a Hugging Face Llama, Mistral or Qwen2 causal LM (e.g. SmolLM2) into this class."""
        c = hf_model.config
        if c.model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"from_hf copies Llama, Mistral and Qwen2 models (pre-norm, RoPE, SwiGLU, GQA); "
                             f"got model_type={c.model_type!r}")
        rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not implemented here")
        if getattr(c, "mlp_bias", False) or getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError("from_hf expects a SwiGLU MLP (silu, no bias)")
        qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        o_bias = bool(getattr(c, "attention_bias", False)) and c.model_type != "qwen2"
        if c.model_type == "qwen2" and getattr(c, "use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=True (windows on some layers only) is not supported")
        window = getattr(c, "sliding_window", None)
        cfg = GPTConfig(vocab_size=c.vocab_size, block_size=c.max_position_embeddings,
                        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                        n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size, d_ff=c.intermediate_size,
                        pos="rope", rope_theta=rope["rope_theta"], norm="rmsnorm", norm_eps=c.rms_norm_eps,
                        act="swiglu", tie_embeddings=c.tie_word_embeddings, bias=False, qkv_bias=qkv_bias,
                        window=window if c.model_type == "mistral" else None)
        if o_bias:
            raise ValueError("an output-projection bias (attention_bias=True on Llama) is not supported here")
        if getattr(c, "head_dim", None) not in (None, cfg.head_dim):
            raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
        model = cls(cfg)
        hf = hf_model.model
        with torch.no_grad():
            model.wte.weight.copy_(hf.embed_tokens.weight)
            for block, layer in zip(model.blocks, hf.layers):
                a = layer.self_attn
                block.ln_1.weight.copy_(layer.input_layernorm.weight)
                block.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                if qkv_bias:
                    block.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
                block.attn.proj.weight.copy_(a.o_proj.weight)
                block.ln_2.weight.copy_(layer.post_attention_layernorm.weight)
                for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                    getattr(block.mlp, ours).weight.copy_(getattr(layer.mlp, theirs).weight)
            model.ln_f.weight.copy_(hf.norm.weight)
            if not cfg.tie_embeddings:
                model.lm_head.weight.copy_(hf_model.lm_head.weight)
        return model.to(next(hf_model.parameters()).device).eval()
