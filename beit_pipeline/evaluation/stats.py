"""Confidence intervals for the fidelity report: a rate, and the paired difference of two rates.

* ``wilson``: the Wilson score interval of a binomial proportion (Wilson 1927; Newcombe 1998a,
  "Two-sided confidence intervals for the single proportion", method 3).  Closed form, never
  outside [0, 1], close to nominal coverage even for 0 of n or n of n, unlike the Wald interval.
* ``newcombe_paired``: the interval for p1 - p2 when both rates are measured on the same images
  (here: a stage's Top-1 minus PyTorch's), Newcombe's hybrid score ("square-and-add") interval for
  paired data (Newcombe 1998b, Stat Med 17:2635-2650, method 10, with its continuity-corrected
  correlation), the interval Fagerland, Lydersen and Laake (2014, Stat Med 33:2850-2875) recommend.
  The difference is (gained - lost) / n: only the discordant images move it, and the correlation
  term makes the interval shrink with them, so 50,000 images of which 1.5% change give about
  +-0.1 points, where two independent Wilson intervals would give +-0.4.

Checked in tests/test_fidelity.py against published values (Wilson 13/16 -> 0.5699 to 0.9341;
the paired table [[59, 6], [16, 80]] -> -0.0621, -0.1186 to -0.0046, as in Fagerland et al.'s
worked example and the contingencytables R package's tests).
"""

import dataclasses
import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


@dataclasses.dataclass(frozen=True)
class PairedCounts:
    """Two classifiers on the same n images: right in both, only in the first, only in the second, in neither."""
    both: int
    only_first: int
    only_second: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_first + self.only_second + self.neither


def wilson(hits: int, n: int, z: float = Z95) -> tuple:
    """(low, high) of the Wilson score interval for ``hits`` of ``n`` (fractions; (0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in [0, {n}], got {hits}")
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 or n hits the formula gives exactly 0 or 1 up to rounding; say so exactly.
    return (0.0 if hits == 0 else max(0.0, centre - half)), (1.0 if hits == n else min(1.0, centre + half))


def _correlation(t: PairedCounts) -> float:
    """Newcombe's continuity-corrected estimate of the correlation between the two rates (phi-hat)."""
    first, second = t.both + t.only_first, t.both + t.only_second
    margins = first * (t.n - first) * second * (t.n - second)
    if margins == 0:
        return 0.0
    excess = t.both * t.neither - t.only_first * t.only_second
    if excess > t.n / 2:
        return (excess - t.n / 2) / math.sqrt(margins)
    return 0.0 if excess >= 0 else excess / math.sqrt(margins)


def newcombe_paired(t: PairedCounts, z: float = Z95) -> tuple:
    """(low, high) for p1 - p2 on paired data, p1 = (both + only_first) / n, p2 = (both + only_second) / n."""
    n = t.n
    if n <= 0:
        return -1.0, 1.0
    p1, p2 = (t.both + t.only_first) / n, (t.both + t.only_second) / n
    l1, u1 = wilson(t.both + t.only_first, n, z)
    l2, u2 = wilson(t.both + t.only_second, n, z)
    phi = _correlation(t)
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


def percent_interval(interval: tuple, digits: int = 2) -> list:
    """[low, high] in percent (points for a difference), rounded for the report."""
    return [round(100.0 * interval[0], digits), round(100.0 * interval[1], digits)]
