"""Exercises of 10_norms_and_activations: the tanh GELU, a SwiGLU MLP, the dead-unit fraction."""
import math

import torch
import torch.nn.functional as F

from . import Case, exercise

# --- 10.gelu_tanh ---------------------------------------------------------------------------------


@exercise("10.gelu_tanh", "GELU's tanh approximation (GPT-2's)", cases=lambda g: [
    Case(torch.linspace(-4, 4, 17), label="x from -4 to 4 (GELU dips below 0 around x = -0.75)"),
    Case(torch.tensor([0.0]), label="x = 0: GELU(0) = 0"),
    Case(torch.tensor([-20.0, 20.0]), label="large |x|: 0 far left, x far right"),
    Case(torch.randn(3, 8, generator=g), label="a (3, 8) batch of activations")], atol=1e-6)
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): = F.gelu(x, approximate='tanh')."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@gelu_tanh.mistake("the cubic term is x squared: the formula is x + 0.044715 x^3 (x ** 3), odd like tanh itself, "
                   "so that GELU(-x) = GELU(x) - x holds")
def _(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 2)))


@gelu_tanh.mistake("the constant is 2/pi, not its square root: tanh's argument is sqrt(2/pi) (x + 0.044715 x^3), "
                   "sqrt(2/pi) = 0.798")
def _(x):
    return 0.5 * x * (1 + torch.tanh(2 / math.pi * (x + 0.044715 * x ** 3)))


@gelu_tanh.mistake("forgot the factor 0.5: (1 + tanh(...)) runs from 0 to 2, so GELU(x) would tend to 2x "
                   "for large x; 0.5 (1 + tanh) is a smooth step from 0 to 1")
def _(x):
    return x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


# --- 10.swiglu ------------------------------------------------------------------------------------

def _swiglu_cases(g):
    def weights(C, H):
        return (torch.randn(C, H, generator=g) / C ** 0.5, torch.randn(C, H, generator=g) / C ** 0.5,
                torch.randn(H, C, generator=g) / H ** 0.5)
    return [Case(torch.randn(2, 3, 4, generator=g), *weights(4, 6), label="x (B=2, T=3, C=4), hidden 6"),
            Case(torch.randn(1, 1, 8, generator=g), *weights(8, 16), label="a single token, hidden 16"),
            Case(torch.zeros(1, 2, 4), *weights(4, 4), label="x = 0: the output is exactly 0"),
            Case(3 * torch.randn(2, 2, 4, generator=g), *weights(4, 8), label="large activations")]


@exercise("10.swiglu", "a SwiGLU MLP (Llama's)", cases=_swiglu_cases)
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, T, C): (silu(x @ w_gate) * (x @ w_up)) @ w_down. Weights stored (in, out)."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down        # the gate decides, element by element


@swiglu.mistake("SiLU went on the up projection instead of the gate: silu(x @ w_gate) is the gate, x @ w_up "
                "stays linear (Llama: down(silu(gate(x)) * up(x)))")
def _(x, w_gate, w_up, w_down):
    return ((x @ w_gate) * F.silu(x @ w_up)) @ w_down


@swiglu.mistake("the gate uses sigmoid instead of SiLU: that is GLU; SwiGLU's gate is silu(z) = z * sigmoid(z)")
def _(x, w_gate, w_up, w_down):
    return (torch.sigmoid(x @ w_gate) * (x @ w_up)) @ w_down


@swiglu.mistake("the up projection is missing: SwiGLU multiplies the gated branch by a second, linear branch "
                "x @ w_up before projecting down (that product is what 'GLU' means)")
def _(x, w_gate, w_up, w_down):
    return F.silu(x @ w_gate) @ w_down


# --- 10.dead_fraction -----------------------------------------------------------------------------

@exercise("10.dead_fraction", "the fraction of dead ReLU units", cases=[
    Case(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.5]]), label="unit 0 dead, units 1 and 2 fire somewhere"),
    Case(torch.zeros(4, 5), label="everything zero: every unit is dead"),
    Case(torch.ones(3, 4), label="every unit fires on every token: none dead"),
    Case(torch.tensor([[[0.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]]),
         label="(B, T, d_ff) input: unit 0 dead on all 4 tokens, unit 1 fires once")])
def dead_fraction(h: torch.Tensor) -> float:
    """h: ReLU outputs (..., d_ff) over many tokens. A unit is dead when it is exactly 0 on EVERY token."""
    per_unit = h.reshape(-1, h.shape[-1])                      # (tokens, d_ff)
    return (per_unit == 0).all(dim=0).float().mean().item()


@dead_fraction.mistake("counted zero entries, not dead units: ReLU is 0 on about half of all inputs in a healthy "
                       "network; a unit is dead only when it is 0 on every token (.all over the tokens)")
def _(h):
    return (h == 0).float().mean().item()


@dead_fraction.mistake("a unit counted as dead when it is 0 on ANY token: use .all over the token axis, not .any")
def _(h):
    return (h.reshape(-1, h.shape[-1]) == 0).any(dim=0).float().mean().item()


@dead_fraction.mistake("the token and unit axes are swapped: reduce over the tokens (all rows) for each unit "
                       "(column), then average over the units")
def _(h):
    return (h.reshape(-1, h.shape[-1]) == 0).all(dim=1).float().mean().item()
