"""Exercises of 00_setup_and_tools: choosing the device, the median of repeated timings, one greedy step."""
import torch

from . import Case, exercise

# --- 00.pick_device -------------------------------------------------------------------------------


@exercise("00.pick_device", "choose the device: cuda, then mps, then cpu", cases=[
    Case(True, False, label="an NVIDIA GPU"), Case(False, True, label="a Mac with Apple silicon"),
    Case(False, False, label="CPU only (this lab's CI)"),
    Case(True, True, label="both report available: CUDA is the faster, better-supported backend")])
def pick_device(cuda_available: bool, mps_available: bool) -> str:
    """'cuda' if available, else 'mps' if available, else 'cpu'."""
    if cuda_available:
        return "cuda"
    return "mps" if mps_available else "cpu"


@pick_device.mistake("mps is checked before cuda: the order is cuda, then mps, then cpu")
def _(cuda_available, mps_available):
    if mps_available:
        return "mps"
    return "cuda" if cuda_available else "cpu"


@pick_device.mistake("mps is never chosen: on a Mac without CUDA, torch.backends.mps.is_available() says "
                     "whether the Apple GPU can be used")
def _(cuda_available, mps_available):
    return "cuda" if cuda_available else "cpu"


# --- 00.median_time -------------------------------------------------------------------------------

@exercise("00.median_time", "the median of repeated timings", cases=[
    Case([0.30, 0.10, 0.20], label="3 timings, unsorted: the median is the middle one once sorted"),
    Case([0.10, 0.40, 0.20, 0.30], label="an even count: the mean of the two middle values"),
    Case([0.10, 0.11, 0.10, 5.00, 0.12], label="one run slowed by a neighbour: the median ignores it"),
    Case([0.25], label="a single timing")])
def median_time(times: list[float]) -> float:
    """The median of ``times``: robust to the one run a busy neighbour slowed down."""
    s, n = sorted(times), len(times)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@median_time.mistake("this is the mean: one slow run (a neighbour busy on the other core) drags it up; the "
                     "median of the sorted timings ignores it")
def _(times):
    return sum(times) / len(times)


@median_time.mistake("the timings were not sorted first: the median is the middle value of the SORTED list")
def _(times):
    n = len(times)
    return times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2


@median_time.mistake("with an even count the median is the mean of the two middle values, not the upper one")
def _(times):
    return sorted(times)[len(times) // 2]


# --- 00.greedy_next -------------------------------------------------------------------------------

def _logit_cases(g):
    return [Case(torch.randn(1, 5, 11, generator=g), label="batch 1, 5 positions, vocabulary 11"),
            Case(torch.randn(3, 4, 7, generator=g), label="batch 3: one next token per sequence"),
            Case(torch.randn(2, 1, 5, generator=g), label="a single position (a decode step with a cache)"),
            Case(torch.tensor([[[0.0, 5.0, 1.0], [9.0, 0.0, 1.0]]]), label="the last position's best is id 0")]


@exercise("00.greedy_next", "one greedy step", cases=_logit_cases)
def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, T, vocab) -> (B, 1): the most likely next token after the LAST position of each sequence."""
    return logits[:, -1].argmax(-1, keepdim=True)


@greedy_next.mistake("the argmax was taken at the first position: the next token comes from the LAST position's "
                     "logits, logits[:, -1]")
def _(logits):
    return logits[:, 0].argmax(-1, keepdim=True)


@greedy_next.mistake("keepdim is missing: the result must be (B, 1) so it can be fed back as input_ids of one "
                     "token (or concatenated to the sequence along dim 1)")
def _(logits):
    return logits[:, -1].argmax(-1)


@greedy_next.mistake("the argmax ran over the positions, not the vocabulary: argmax(-1) over the last axis "
                     "picks a token id")
def _(logits):
    return logits.argmax(1)[:, -1:]
