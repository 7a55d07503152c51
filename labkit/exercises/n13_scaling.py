"""Exercises of 13_scaling_laws: the exact training FLOPs of a GPT per token, a power law fitted in
log space, and the compute-optimal size at the minimum of an isoFLOP parabola."""
import numpy as np

from . import Case, exercise

# --- 13.train_flops_per_token ---------------------------------------------------------------------


@exercise("13.train_flops_per_token", "the exact training FLOPs of a GPT per token", cases=[
    Case(16, 1, 83, 64, label="the smallest size of the sweep: d=16, 1 layer, 83 characters, 64-token context"),
    Case(96, 3, 83, 64, label="the largest size of the sweep: d=96, 3 layers"),
    Case(768, 12, 50257, 1024, label="GPT-2 small: d=768, 12 layers, 50,257 BPE tokens, 1,024-token context"),
    Case(4, 2, 10, 1, label="a context of 1 token: attention reads only itself"),
])
def train_flops_per_token(n_embd: int, n_layer: int, vocab_size: int, block_size: int) -> int:
    """Forward + backward FLOPs per training token of the labkit GPT (tied embeddings, learned
    positions), counting every matmul: the blocks, the output layer and attention's own two."""
    d, L, V, T = n_embd, n_layer, vocab_size, block_size
    weights = 12 * L * d * d + d * V     # matmul weights a token passes: per block qkv 3d², proj d², MLP 8d²; the output layer dV
    attention = 2 * 2 * T * d * L        # forward: q·kᵀ over T keys and the weighted sum of T values, 2·T·d each
    return 3 * (2 * weights + attention)  # forward 2 FLOPs per weight (multiply, add); backward twice that


@train_flops_per_token.mistake("this is C = 6N with N the non-embedding parameters: it leaves out the output layer "
                               "(d·V weights, tied to the embedding so not in N, but a real matmul) and attention's "
                               "two matmuls (2·2·T·d per layer forward). Add both, each times 3 for the backward pass")
def _(n_embd, n_layer, vocab_size, block_size):
    return 6 * 12 * n_layer * n_embd ** 2


@train_flops_per_token.mistake("counted the forward pass only (2 FLOPs per weight): training also runs the backward "
                               "pass, which costs twice the forward (a gradient for the input AND for the weight), "
                               "so multiply the forward count by 3")
def _(n_embd, n_layer, vocab_size, block_size):
    return 2 * (12 * n_layer * n_embd ** 2 + n_embd * vocab_size) + 2 * 2 * block_size * n_embd * n_layer


@train_flops_per_token.mistake("left out the output layer: with tied embeddings its d·V weights are not counted in "
                               "N, but every token still multiplies by them (6·d·V FLOPs), and for a small model "
                               "it is a large share")
def _(n_embd, n_layer, vocab_size, block_size):
    return 6 * 12 * n_layer * n_embd ** 2 + 3 * 2 * 2 * block_size * n_embd * n_layer


@train_flops_per_token.mistake("left out attention's own matmuls (q·kᵀ and the weighted sum of values: 2·2·T·d per "
                               "layer forward, times 3 with the backward): they have no weights, so 6N never sees them")
def _(n_embd, n_layer, vocab_size, block_size):
    return 6 * (12 * n_layer * n_embd ** 2 + n_embd * vocab_size)


# --- 13.power_law_fit -----------------------------------------------------------------------------

def _power_law_cases(g):
    rng = np.random.default_rng(0)
    x = np.geomspace(3e3, 3e5, 6)
    return [
        Case(x, 2.0 * x ** -0.5, label="an exact power law y = 2·x^-0.5"),
        Case(x, 12.0 * x ** -0.076 * np.exp(0.01 * rng.standard_normal(6)),
             label="a Kaplan-like exponent -0.076 with 1% noise"),
        Case(np.array([1e10, 1e12]), np.array([3e3, 3e5]), label="two points, N_opt growing with C: a = 1"),
        Case(np.geomspace(1e6, 1e8, 5), 5.0 * np.geomspace(1e6, 1e8, 5) ** 0.5, label="a growing law y = 5·x^0.5"),
    ]


@exercise("13.power_law_fit", "a power law fitted as a line in log-log", cases=_power_law_cases,
          rtol=1e-6, atol=1e-9, output_names=("a", "c"))
def power_law_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, c) of y ≈ c·x^a, by least squares on log y = log c + a·log x (a < 0: y falls with x)."""
    a, log_c = np.polyfit(np.log(x), np.log(y), 1)      # a straight line in log-log: slope a, intercept log c
    return float(a), float(np.exp(log_c))


@power_law_fit.mistake("fitted a line to x and y themselves: a power law is a straight line only in log-log. "
                       "Take np.log of both before np.polyfit")
def _(x, y):
    a, c = np.polyfit(x, y, 1)
    return float(a), float(c)


@power_law_fit.mistake("x and y are swapped: np.polyfit(log x, log y, 1) fits log y as a function of log x "
                       "(its first argument is the x axis)")
def _(x, y):
    a, log_c = np.polyfit(np.log(y), np.log(x), 1)
    return float(a), float(np.exp(log_c))


@power_law_fit.mistake("the exponent is right but c is not: the intercept is in the base of the log you took "
                       "(np.log: natural), so c = np.exp(intercept), not 10 ** intercept")
def _(x, y):
    a, log_c = np.polyfit(np.log(x), np.log(y), 1)
    return float(a), float(10 ** log_c)


@power_law_fit.mistake("only x is on a log scale: log y against log x, not y against log x (that fits "
                       "y = c + a·log x, an exponential-looking curve, not a power law)")
def _(x, y):
    a, c = np.polyfit(np.log(x), y, 1)
    return float(a), float(c)


# --- 13.parabola_minimum --------------------------------------------------------------------------

def _interior(x, L, a2, x_min):
    """The reference's test, shared by the mistakes so each differs from it by one bug only."""
    return 0 < np.argmin(L) < len(L) - 1 and a2 > 0 and x.min() < x_min < x.max()


def _iso(x_min, curvature, xs, floor=2.0):
    """Losses on a parabola in log10 N with its minimum at x_min: (N, L) arrays."""
    xs = np.asarray(xs, float)
    return 10 ** xs, floor + curvature * (xs - x_min) ** 2


@exercise("13.parabola_minimum", "the compute-optimal size at an isoFLOP parabola's minimum", cases=[
    Case(*_iso(4.2, 0.3, [3.5, 3.9, 4.4, 4.8, 5.2]), label="a U-shaped isoFLOP curve, minimum between two sizes"),
    Case(*_iso(3.9, 0.5, [3.7, 4.1, 4.5]), label="three sizes, the minimum near the smallest"),
    Case(np.array([5e3, 2e4, 8e4, 3e5]), np.array([2.30, 2.20, 2.16, 2.15]),
         label="loss still falling at the largest size (the parabola's vertex is inside, but "
               "the data never turns): no N_opt"),
    Case(np.array([5e3, 2e4, 8e4]), np.array([2.1, 2.3, 2.1]),
         label="an upside-down curve (a maximum, not a minimum): no N_opt"),
    Case(*_iso(4.75, 0.2, [4.0, 4.3, 4.6, 5.1, 5.5, 5.8]), label="a wide, shallow U over six sizes"),
], rtol=1e-6)
def parabola_minimum(N: np.ndarray, L: np.ndarray) -> float:
    """N_opt: the minimum of L = a2·x² + a1·x + a0 fitted with x = log10 N — only where the measured
    losses turn (the lowest is neither the smallest nor the largest size), a2 > 0 and the minimum
    lies between the sizes given; NaN otherwise (no claim beyond what was measured)."""
    x = np.log10(N)
    a2, a1, a0 = np.polyfit(x, L, 2)                     # highest power first
    x_min = -a1 / (2 * a2)                               # where dL/dx = 2·a2·x + a1 = 0
    turns = 0 < np.argmin(L) < len(L) - 1                # a larger loss on both sides of the best size measured
    inside = turns and a2 > 0 and x.min() < x_min < x.max()   # a minimum (not a maximum), between the sizes
    return float(10 ** x_min) if inside else float("nan")


@parabola_minimum.mistake("returned the minimum in log10 units: x_min is log10 N_opt, so return 10 ** x_min")
def _(N, L):
    x = np.log10(N)
    a2, a1, a0 = np.polyfit(x, L, 2)
    x_min = -a1 / (2 * a2)
    return float(x_min) if _interior(x, L, a2, x_min) else float("nan")


@parabola_minimum.mistake("the vertex of a2·x² + a1·x + a0 is at -a1 / (2·a2) (where the derivative 2·a2·x + a1 is "
                          "zero), not -a1 / a2")
def _(N, L):
    x = np.log10(N)
    a2, a1, a0 = np.polyfit(x, L, 2)
    x_min = -a1 / a2
    return float(10 ** x_min) if _interior(x, L, a2, x_min) else float("nan")


@parabola_minimum.mistake("returned a vertex that is no measured minimum: require that the losses turn (the best "
                          "size is neither the smallest nor the largest), a2 > 0 (else it is a maximum) and x_min "
                          "between the sizes measured; otherwise return NaN — a parabola through a curve that "
                          "only falls still has a vertex, and placing it is extrapolation, not measurement")
def _(N, L):
    x = np.log10(N)
    a2, a1, a0 = np.polyfit(x, L, 2)
    return float(10 ** (-a1 / (2 * a2)))


@parabola_minimum.mistake("returned the best size measured (the argmin of L), not the parabola's minimum: the "
                          "parabola places N_opt between the sizes you trained")
def _(N, L):
    x = np.log10(N)
    a2, a1, a0 = np.polyfit(x, L, 2)
    x_min = -a1 / (2 * a2)
    return float(N[np.argmin(L)]) if _interior(x, L, a2, x_min) else float("nan")


@parabola_minimum.mistake("fitted the parabola in N itself: isoFLOP curves are parabolas in log N (sizes are "
                          "spaced by factors), so fit against np.log10(N)")
def _(N, L):
    a2, a1, a0 = np.polyfit(N, L, 2)
    x_min = -a1 / (2 * a2)
    return float(x_min) if _interior(N, L, a2, x_min) else float("nan")
