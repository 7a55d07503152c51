"""Claims a skeptic accepts: a verdict for every Predict, and orderings only beyond the seed spread.

Every experiment in the lab starts with a *Predict* cell and ends with a printed verdict on
exactly what was predicted; a ranking of two settings is claimed only when the gap between them
is larger than what changing the seed does to either::

    print(verdict(loss < 2.0, predicted="val loss below 2.0 nats", measured=f"{loss:.3f}"))
    # ✓ prediction held: predicted val loss below 2.0 nats; measured 1.874

    rope, learned = Spread([2.31, 2.29, 2.33]), Spread([2.45, 2.41, 2.44])   # one value per seed
    cmp = compare(rope, learned, "rope", "learned")       # lower is better by default (losses)
    print(cmp)                                            # rope < learned: gap 0.130 > spread 0.040 (3 seeds each)
    assert cmp.decided and cmp.better == "rope"
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


def verdict(held: bool, predicted: str = "", measured: str = "") -> str:
    """One line stating whether this run bore the prediction out, and on what numbers.

    The contract test (tests/test_contract.py) counts these lines: one per Predict cell.

    >>> verdict(True, "val loss below 2.0 nats", "1.874")
    '✓ prediction held: predicted val loss below 2.0 nats; measured 1.874'
    >>> verdict(False, "a 10x speed-up at 100 tokens", "4.2x")
    '✗ prediction missed: predicted a 10x speed-up at 100 tokens; measured 4.2x (the measurement is the answer)'
    >>> verdict(True), verdict(False)
    ('✓ prediction held', '✗ prediction missed: the measured number is the answer')
    """
    head = "✓ prediction held" if held else "✗ prediction missed"
    detail = "; ".join(part for part in (f"predicted {predicted}" if predicted else "",
                                          f"measured {measured}" if measured else "") if part)
    if not detail:
        return head if held else f"{head}: the measured number is the answer"
    return f"{head}: {detail}" + ("" if held else " (the measurement is the answer)")


@dataclass
class Spread:
    """One quantity measured several times (seeds, repeats): median and range.

    >>> s = Spread([3.0, 1.0, 2.0])
    >>> s.median, s.lo, s.hi, s.width, str(s)
    (2.0, 1.0, 3.0, 2.0, '2.000 (1.000-3.000, n=3)')
    """
    values: list[float]

    def __post_init__(self):
        self.values = [float(v) for v in self.values]
        if not self.values:
            raise ValueError("a Spread needs at least one measurement")

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def width(self) -> float:
        """hi - lo: how much the measurement moved between repeats."""
        return self.hi - self.lo

    def format(self, fmt: str = ".3f") -> str:
        return f"{self.median:{fmt}} ({self.lo:{fmt}}-{self.hi:{fmt}}, n={len(self.values)})"

    def __str__(self) -> str:
        return self.format()


@dataclass
class Comparison:
    """The outcome of ``compare``: ``decided`` only when the gap beats the spread."""
    a: str
    b: str
    gap: float           # |median(a) - median(b)|
    spread: float        # the larger of the two ranges
    n: int               # the smaller number of repeats
    decided: bool
    better: str | None   # the name of the better one when decided
    text: str

    def __str__(self) -> str:
        return self.text


def compare(a: Spread, b: Spread, name_a: str = "A", name_b: str = "B", lower_is_better: bool = True,
            min_repeats: int = 3, fmt: str = ".3f") -> Comparison:
    """Order two measurements only if their medians differ by more than either one's seed spread.

    Fewer than ``min_repeats`` values on either side never decide: one seed cannot tell a real
    difference from luck.

    >>> print(compare(Spread([2.31, 2.29, 2.33]), Spread([2.45, 2.41, 2.44]), "rope", "learned"))
    rope < learned: gap 0.130 > spread 0.040 (3 seeds each)
    >>> print(compare(Spread([2.31, 2.29, 2.40]), Spread([2.35, 2.33, 2.37]), "rope", "learned"))
    no difference measurable between rope and learned: gap 0.040 <= spread 0.110 (3 seeds each)
    >>> print(compare(Spread([2.0]), Spread([3.0]), "x", "y"))
    no difference measurable between x and y: 1 seed is not enough (need 3)
    """
    n = min(len(a.values), len(b.values))
    gap, spread = abs(a.median - b.median), max(a.width, b.width)
    if n < min_repeats:
        text = (f"no difference measurable between {name_a} and {name_b}: {n} seed"
                f"{'s are' if n != 1 else ' is'} not enough (need {min_repeats})")
        return Comparison(name_a, name_b, gap, spread, n, False, None, text)
    decided = gap > spread
    seeds = f"({n} seeds each)" if len(a.values) == len(b.values) else f"(>= {n} seeds each)"
    if not decided:
        text = (f"no difference measurable between {name_a} and {name_b}: gap {gap:{fmt}} <= spread "
                f"{spread:{fmt}} {seeds}")
        return Comparison(name_a, name_b, gap, spread, n, False, None, text)
    a_wins = (a.median < b.median) == lower_is_better
    better, worse = (name_a, name_b) if a_wins else (name_b, name_a)
    sign = "<" if lower_is_better else ">"
    text = f"{better} {sign} {worse}: gap {gap:{fmt}} > spread {spread:{fmt}} {seeds}"
    return Comparison(name_a, name_b, gap, spread, n, True, better, text)
