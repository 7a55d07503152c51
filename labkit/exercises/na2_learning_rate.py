"""Exercises of A2_learning_rate: perplexity from batch losses, and a divergence detector."""
import math

from . import Case, exercise

# --- A2.perplexity --------------------------------------------------------------------------------


@exercise("A2.perplexity", "perplexity from per-batch losses", cases=[
    Case([2.0], [100], label="one batch: perplexity = exp(loss)"),
    Case([1.0, 3.0], [50, 50], label="two batches of equal size"),
    Case([1.0, 3.0], [10, 90], label="batches of different sizes: a token counts once, wherever it is"),
    Case([0.0, 0.0, 0.0], [5, 7, 9], label="a perfect model: loss 0, perplexity 1"),
    Case([4.2, 3.9, 4.05, 4.4], [128, 128, 96, 31], label="realistic losses, a short last batch"),
], rtol=1e-6)
def perplexity(batch_losses: list[float], batch_tokens: list[int]) -> float:
    """exp of the mean loss PER TOKEN: batch i holds batch_tokens[i] scored tokens, mean loss batch_losses[i] (nats)."""
    total_nll = sum(loss * n for loss, n in zip(batch_losses, batch_tokens))   # nats over every scored token
    return math.exp(total_nll / sum(batch_tokens))


@perplexity.mistake("averaged the batches' perplexities (the mean of exp(loss)): exp is convex, so that is "
                    "always >= the true perplexity. Average the LOSSES (per token), then take exp once")
def _(batch_losses, batch_tokens):
    return sum(math.exp(loss) * n for loss, n in zip(batch_losses, batch_tokens)) / sum(batch_tokens)


@perplexity.mistake("every batch got the same weight: a batch of 10 tokens counted as much as one of 90. "
                    "Weight each batch's loss by its number of tokens")
def _(batch_losses, batch_tokens):
    return math.exp(sum(batch_losses) / len(batch_losses))


@perplexity.mistake("used 2 ** loss: the losses are in nats (natural log, as cross_entropy computes them), so "
                    "perplexity is e ** loss (2 ** loss is for losses in bits)")
def _(batch_losses, batch_tokens):
    return 2 ** (sum(loss * n for loss, n in zip(batch_losses, batch_tokens)) / sum(batch_tokens))


# --- A2.diverged ----------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@exercise("A2.diverged", "a divergence detector", cases=[
    Case([3.0, 2.5, 2.2, 2.0, 1.9], label="a healthy run: falling loss"),
    Case([3.0, 3.2, 2.9, 3.1, 2.8], label="noisy but not diverging: never 1.5x above its best"),
    Case([3.0, 2.0, 1.0, 1.6], label="fell to 1.0, then jumped to 1.6: 1.6x the best so far"),
    Case([3.0, 4.0, 6.0, 9.0], label="blows up without a NaN"),
    Case([3.0, 2.5, NAN], label="NaN"),
    Case([3.0, 2.5, INF, 2.0], label="inf (then a finite value again)"),
    Case([INF, 3.0], label="inf at the very first step"),
    Case([], label="no steps yet"),
    Case([2.0, 1.0, 1.4], factor=1.3, label="factor=1.3: 1.4 is 1.4x the best"),
])
def diverged(losses: list[float], factor: float = 1.5) -> bool:
    """True if a loss is NaN or inf, or rises above ``factor`` x the best (lowest) loss before it."""
    best = math.inf
    for loss in losses:
        if not math.isfinite(loss):      # NaN or +-inf: the run is broken, whatever came before
            return True
        if loss > factor * best:         # far above where it already was: not noise, a blow-up
            return True
        best = min(best, loss)
    return False


@diverged.mistake("only NaN is caught: a loss can blow up to 9.0 (or inf) while staying a number. Also flag a "
                  "loss above factor x the best loss so far")
def _(losses, factor=1.5):
    return any(math.isnan(loss) for loss in losses)


@diverged.mistake("compared with the FIRST loss: a run that fell from 3.0 to 1.0 and jumps to 1.6 has blown up, "
                  "but 1.6 is still below 1.5 x 3.0. Compare with the best loss so far")
def _(losses, factor=1.5):
    if not losses:
        return False
    return any(not math.isfinite(loss) or loss > factor * losses[0] for loss in losses)


@diverged.mistake("math.isnan misses inf: an inf loss at the very first step is never above factor x anything "
                  "(the best so far is still inf). Use math.isfinite(loss): False for NaN, inf and -inf")
def _(losses, factor=1.5):
    best = math.inf
    for loss in losses:
        if math.isnan(loss) or loss > factor * best:
            return True
        best = min(best, loss)
    return False
