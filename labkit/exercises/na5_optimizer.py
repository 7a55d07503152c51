"""Exercises of A5_optimizer_state: one AdamW step with bias correction, 8-bit blockwise absmax
quantization of an optimizer state."""
import torch

from . import Case, exercise

# --- A5.adamw_step --------------------------------------------------------------------------------


def _adam_cases(g):
    p, grad = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    m, v = 0.1 * torch.randn(4, 3, generator=g), 0.01 * torch.rand(4, 3, generator=g)
    tiny = 1e-4 * torch.randn(6, generator=g)
    zeros = torch.zeros(4, 3)
    return [
        Case(p, grad, zeros, zeros, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0,
             label="step 1 from zero states: every entry moves by lr against the sign of its gradient"),
        Case(p, grad, m, v, 10, 1e-3, 0.9, 0.95, 1e-8, 0.1, label="step 10, betas (0.9, 0.95), weight decay 0.1"),
        Case(p, grad, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0, label="step 3, betas (0.9, 0.999): bias correction is large"),
        Case(torch.ones(6), tiny, torch.zeros(6), torch.zeros(6), 1, 1e-2, 0.9, 0.999, 1e-3, 0.0,
             label="gradients of 1e-4 with eps 1e-3: eps dominates the denominator"),
        Case(p, torch.zeros(4, 3), zeros, zeros, 1, 1e-2, 0.9, 0.95, 1e-8, 0.5,
             label="zero gradient, weight decay 0.5: only the decay moves the weights"),
        Case(p, grad, m, v, 1_000_000, 1e-3, 0.9, 0.999, 1e-8, 0.0,
             label="step 1e6: the bias corrections are 1, Adam without them"),
    ]


@exercise("A5.adamw_step", "one AdamW step with bias correction", cases=_adam_cases, atol=1e-6, rtol=1e-5,
          output_names=("param", "m", "v"))
def adamw_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """torch.optim.AdamW's update of one parameter at step ``step`` (1, 2, ...): returns the new
    (param, m, v) as new tensors; the inputs stay unchanged."""
    param = param * (1 - lr * weight_decay)            # decoupled weight decay: shrink W, outside the adaptive step
    m = beta1 * m + (1 - beta1) * grad                 # first moment: EMA of the gradient
    v = beta2 * v + (1 - beta2) * grad * grad          # second moment: EMA of the squared gradient
    m_hat = m / (1 - beta1 ** step)                    # bias correction: m and v start at 0, so early
    v_hat = v / (1 - beta2 ** step)                    # EMAs are too small by exactly these factors
    param = param - lr * m_hat / (v_hat.sqrt() + eps)  # eps outside the sqrt, as torch does
    return param, m, v


@adamw_step.mistake("no bias correction: m and v start at 0, so for the first steps their EMAs are too small "
                    "by (1 - beta1^t) and (1 - beta2^t). Divide: m_hat = m / (1 - beta1**step), "
                    "v_hat = v / (1 - beta2**step), and step with m_hat / (sqrt(v_hat) + eps)")
def _(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    return param - lr * m / (v.sqrt() + eps), m, v


@adamw_step.mistake("is your epsilon inside the sqrt? torch's Adam divides by sqrt(v_hat) + eps; "
                    "sqrt(v_hat + eps) is a much larger floor (sqrt(1e-8) = 1e-4), which shrinks the steps "
                    "of parameters with small gradients")
def _(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return param - lr * m_hat / (v_hat + eps).sqrt(), m, v


@adamw_step.mistake("that is Adam + L2, not AdamW: weight decay was added to the gradient (grad + wd * param), "
                    "so it goes through m and v and is rescaled per parameter. AdamW decays the weight "
                    "directly, param * (1 - lr * wd), before the adaptive step")
def _(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    grad = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


@adamw_step.mistake("the moving-average weights are swapped: m = beta1 * m + (1 - beta1) * grad keeps 90% of "
                    "the old m and adds 10% of the new gradient (and the same with beta2 for v)")
def _(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = (1 - beta1) * m + beta1 * grad
    v = (1 - beta2) * v + beta2 * grad * grad
    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


# --- A5.quantize_blockwise ------------------------------------------------------------------------

def _blockwise_cases(g):
    outlier = torch.randn(512, generator=g) * 1e-3
    outlier[3] = 5.0                                     # one large value in the first block only
    zero_block = torch.randn(300, generator=g)
    zero_block[:100] = 0.0
    return [
        Case(torch.randn(1000, generator=g), 256, label="1000 values in blocks of 256: the last block has 232"),
        Case(torch.randn(8, 64, generator=g), 128, label="a (8, 64) state: flattened, 4 blocks of 128"),
        Case(outlier, 256, label="an outlier (5.0) in block 0 among values of 1e-3: block 1 keeps its precision"),
        Case(zero_block, 100, label="a block of zeros: absmax 0, codes 0, no NaN"),
        Case(torch.tensor([1.0, -1.0, 0.5, -0.25, 0.126, 0.0]), 3, label="exact values: +-1 -> +-127, 0.5 -> 64"),
    ]


@exercise("A5.quantize_blockwise", "8-bit blockwise absmax quantization", cases=_blockwise_cases,
          output_names=("codes", "absmax"))
def quantize_blockwise(x: torch.Tensor, block_size: int) -> tuple:
    """Flatten ``x`` and cut it into blocks of ``block_size`` (the last may be shorter); per block,
    absmax = max |x| and codes = round(x / absmax * 127) as int8. Returns (codes (n,) int8,
    absmax (n_blocks,) float32); x ≈ codes / 127 * absmax of its block."""
    flat = x.reshape(-1).float()                                             # (n,)
    n = flat.numel()
    n_blocks = -(-n // block_size)                                           # ceil(n / block_size)
    padded = torch.zeros(n_blocks * block_size)
    padded[:n] = flat                                                        # zeros change no absmax
    blocks = padded.view(n_blocks, block_size)                               # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)                                        # (n_blocks,): one scale per block
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))         # an all-zero block: codes 0, no 0/0
    codes = torch.round(blocks / scale[:, None] * 127).to(torch.int8)        # in [-127, 127]
    return codes.view(-1)[:n], absmax


@quantize_blockwise.mistake("one absmax for the whole tensor: a single large value then sets the scale of every "
                            "block, and small values elsewhere all round to 0. Take the max of |x| per block "
                            "(blocks.abs().amax(dim=1)), one scale per block")
def _(x, block_size):
    flat = x.reshape(-1).float()
    n_blocks = -(-flat.numel() // block_size)
    s = flat.abs().max()
    codes = torch.round(flat / (s if s > 0 else 1) * 127).to(torch.int8)
    return codes, torch.full((n_blocks,), s.item())


@quantize_blockwise.mistake("the codes are truncated, not rounded: .to(torch.int8) cuts toward zero (0.99 -> 0), "
                            "a bias toward 0 of up to one step. Apply torch.round before casting")
def _(x, block_size):
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size)
    padded[:n] = flat
    blocks = padded.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (blocks / scale[:, None] * 127).to(torch.int8).view(-1)[:n], absmax


@quantize_blockwise.mistake("scaled by 128: the block's largest value becomes 128, which int8 cannot hold "
                            "(it wraps around to -128, flipping the sign). Scale by 127, the largest int8")
def _(x, block_size):
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size)
    padded[:n] = flat
    blocks = padded.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(blocks / scale[:, None] * 128).to(torch.int16).to(torch.int8).view(-1)[:n], absmax
