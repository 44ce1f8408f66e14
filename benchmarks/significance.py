"""A paired t-test over seeds, exact for the few seeds a benchmark runs, without SciPy.

The reports pair each FedMAE run with a baseline run of the same seed; this is the textbook
significance statement for such pairs: t = mean / (std / sqrt(n)) of the n per-seed differences,
its two-sided p-value from Student's t with n - 1 degrees of freedom. The CDF is the closed form
for integer degrees of freedom (Abramowitz & Stegun 26.7.3 / 26.7.4), so the benchmarks need no
SciPy (only a dev extra pulls it in; the tests check this against it).
"""

from __future__ import annotations

import math
import statistics


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # odd: A = (2/pi) [theta + sin cos (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...)]
        series, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # even: A = sin (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)
        series, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            series += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired_t_p(diffs: list[float]) -> float | None:
    """The two-sided p-value of a paired t-test on per-seed differences ``diffs`` (H0: their
    mean is 0); None for fewer than 2 differences. Identical differences give 0 (all the same
    nonzero value) or 1 (all 0)."""
    if len(diffs) < 2:
        return None
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return student_t_two_sided_p(mean / (std / math.sqrt(len(diffs))), len(diffs) - 1)


def p_text(p: float | None) -> str:
    """A p-value as a table cell: two significant digits, '< 0.001' below that, '-' for None."""
    if p is None:
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"
