"""A GPT you can take apart: every modern component is one config switch away.

Read top to bottom: config -> positions -> norms -> attention -> MLP / MoE -> block -> model.
The defaults build a small GPT-2-style model; ``GPT.from_hf`` builds SmolLM2 (a Llama) and
reproduces Hugging Face's logits, which proves that the RoPE, RMSNorm, SwiGLU and grouped-query
attention below are the real ones::

    cfg = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)                                    # GPT-2 style: learned positions, LayerNorm, GELU
    model = GPT(replace(cfg, pos="rope", norm="rmsnorm", act="swiglu", n_kv_head=2))  # Llama style
    logits, loss = model(idx, targets)                  # idx, targets: (B, T) int64

Hook points carry TransformerLens names (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_pattern``
...): they are identity modules, so ``model.get_submodule(name).register_forward_hook`` reads or
edits the residual stream. Asking for ``hook_pattern`` switches that layer to the hand-written
attention (SDPA never materialises the pattern); both paths give the same output (tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    bias: bool = False
    dropout: float = 0.0
    attn_impl: str = "sdpa"          # sdpa (fast) | manual (the formula, written out)

    def __post_init__(self):
        for field, allowed in OPTIONS.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: use one of {allowed}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and n_head "
                             f"by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE rotates pairs of dimensions: the head size must be even")
        if self.ffn == "moe" and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.d_ff is None:
            self.d_ff = 4 * self.n_embd if self.act != "swiglu" else 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class HookPoint(nn.Identity):
    """An identity layer with a name: hook it to read or edit the tensor passing through
    (TransformerLens's HookPoint; ``labkit.hooks.capture`` / ``patch`` use them by name)."""


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
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.Identity()


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # one matmul for q, k and v; with GQA k and v have fewer heads than q
        self.qkv = nn.Linear(cfg.n_embd, (nh + 2 * nkv) * hd, bias=cfg.bias)
        self.proj = nn.Linear(nh * hd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_pattern = HookPoint()   # (B, nh, T, T) softmax weights, manual path only
        if cfg.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(nh), persistent=False)

    def mask(self, T: int, device) -> torch.Tensor:
        """(T, T) bool, True where query i may read key j: j <= i, and i - j < window."""
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        allowed = j <= i
        if self.cfg.window is not None:
            allowed &= (i - j) < self.cfg.window
        return allowed

    def forward(self, x, rope=None, attn_mask=None):
        B, T, C = x.shape
        cfg, nh, nkv, hd = self.cfg, self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)                      # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)                     # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)                     # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if nkv < nh:  # GQA: query head h reads KV head h // (nh / nkv)
            k = k.repeat_interleave(nh // nkv, dim=1)                 # (B, nh, T, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        allowed = self.mask(T, x.device) if attn_mask is None else attn_mask   # (T, T) or (B, 1, T, T)
        bias = None
        if cfg.pos == "alibi":  # penalty grows linearly with distance, a different slope per head
            dist = (torch.arange(T, device=x.device)[:, None] - torch.arange(T, device=x.device)[None, :])
            bias = -self.slopes.view(nh, 1, 1) * dist.clamp(min=0)    # (nh, T, T)
        p_drop = self.dropout if self.training else 0.0
        if cfg.attn_impl == "manual" or self.hook_pattern._forward_hooks:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)           # (B, nh, T, T)
            if bias is not None:
                att = att + bias
            att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            att = self.hook_pattern(att)
            y = F.dropout(att, p_drop, self.training) @ v             # (B, nh, T, hd)
        elif bias is None and cfg.window is None and attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop)
        else:
            mask = torch.zeros(allowed.shape, device=x.device).masked_fill(~allowed, float("-inf"))
            mask = mask if bias is None else mask + bias
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)                  # (B, T, C): heads side by side
        return self.proj(y)


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
            return self.drop(self.down(self.hook_post(F.silu(self.gate(x)) * self.up(x))))
        return self.drop(self.proj(self.hook_post(self.act(self.fc(x)))))


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

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.residual = cfg.residual
        self.ln_1, self.ln_2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = {"dense": MLP, "moe": MoE}[cfg.ffn](cfg) if cfg.ffn != "none" else None
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, rope=None, attn_mask=None):
        x = self.hook_resid_pre(x)                                     # (B, T, C)
        attn_out = self.hook_attn_out(self.attn(self.ln_1(x), rope, attn_mask))
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
        self.hook_embed = HookPoint()     # token (+ absolute position) embedding
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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
        """Parameter count; by default without the embedding tables (the usual scaling-law N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() if self.cfg.tie_embeddings else 0
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    def forward(self, idx, targets=None, attn_mask=None):
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over targets != -100.

        ``attn_mask`` (T, T) or (B, 1, T, T) bool, True where query i may read key j, replaces
        the causal (and window) mask: all True for a bidirectional encoder (masked LM), or
        bidirectional over a prefix and causal after it (prefix LM, notebook 11).
        """
        B, T = idx.shape
        cfg = self.cfg
        if cfg.pos == "learned" and T > cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={cfg.block_size}: learned "
                             f"positions have no row for it (rope, alibi, sinusoidal and none do)")
        x = self.wte(idx)                                              # (B, T, C)
        if cfg.pos == "learned":
            x = x + self.wpe(torch.arange(T, device=idx.device))
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_table(T, cfg.n_embd).to(x.device)
        rope = self._rope(T, x.device) if cfg.pos == "rope" else None
        x = self.hook_embed(self.drop(x))
        for block in self.blocks:
            x = block(x, rope, attn_mask)
        logits = self.lm_head(self.ln_f(x))                            # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos/sin tables for T positions, reused while T, device and theta stay the same
        (notebook 02 edits ``cfg.rope_theta`` on a trained model: the key must include it)."""
        key = (T, device, self.cfg.head_dim, self.cfg.rope_theta)
        if getattr(self, "_rope_key", None) != key:
            self._rope_tables = tuple(t.to(device) for t in rope_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta))
            self._rope_key = key
        return self._rope_tables

    def hook_points(self) -> dict:
        """Every HookPoint by its module path, for ``labkit.hooks`` (capture, patch, run_with_cache)."""
        from .hooks import HookSite
        return {name: HookSite(mod, "output") for name, mod in self.named_modules()
                if isinstance(mod, HookPoint)}

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
    def from_hf(cls, hf_model) -> "GPT":
        """Copy a Hugging Face Llama-family causal LM (e.g. SmolLM2) into this class."""
        c = hf_model.config
        if c.model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"from_hf supports Llama-style models, got model_type={c.model_type!r}")
        rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not implemented here")
        cfg = GPTConfig(vocab_size=c.vocab_size, block_size=c.max_position_embeddings,
                        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                        n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size, d_ff=c.intermediate_size,
                        pos="rope", rope_theta=rope["rope_theta"], norm="rmsnorm", norm_eps=c.rms_norm_eps,
                        act="swiglu", tie_embeddings=c.tie_word_embeddings,
                        bias=bool(getattr(c, "attention_bias", False)))
        if getattr(c, "head_dim", cfg.head_dim) != cfg.head_dim:
            raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
        model = cls(cfg)
        hf = hf_model.model
        with torch.no_grad():
            model.wte.weight.copy_(hf.embed_tokens.weight)
            for block, layer in zip(model.blocks, hf.layers):
                a = layer.self_attn
                block.ln_1.weight.copy_(layer.input_layernorm.weight)
                block.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                if cfg.bias:
                    block.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
                block.attn.proj.weight.copy_(a.o_proj.weight)
                block.ln_2.weight.copy_(layer.post_attention_layernorm.weight)
                for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                    getattr(block.mlp, ours).weight.copy_(getattr(layer.mlp, theirs).weight)
            model.ln_f.weight.copy_(hf.norm.weight)
            if not cfg.tie_embeddings:
                model.lm_head.weight.copy_(hf_model.lm_head.weight)
        return model.to(next(hf_model.parameters()).device).eval()
