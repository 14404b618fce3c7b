"""The paired t-test that comparisons across seeds report (`egmla compare --seeds`, experiments/claims.py), in the
standard library alone (scipy is not a dependency; the tests check these against it)."""
from __future__ import annotations

import math
import statistics


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with an integer df (Abramowitz & Stegun 26.7.3-4, exact)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    term = series = 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        inside = sin * series
    else:
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2 / math.pi * (theta + (sin * math.sqrt(cos2) * series if df > 1 else 0.0))
    return max(0.0, 1.0 - inside)


def sample_sd(values) -> float:
    """statistics.stdev (n-1), NaN where a value is NaN or infinite (a diverged run's loss), where statistics.stdev
    raises AttributeError ('float' object has no attribute 'numerator')."""
    values = list(values)
    return statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan


def paired_t_test(differences: list[float]) -> dict:
    """n, mean, sd (n-1), t and two-sided p of the paired t-test of 'mean difference = 0' (n >= 2). A difference
    that is not finite gives sd, t and p NaN: no test (a NaN p compares as not significant)."""
    n, mean = len(differences), statistics.mean(differences)
    result = {"n": n, "mean": mean, "sd": None, "t": None, "p": None}
    if n >= 2 and not all(map(math.isfinite, differences)):
        result.update(sd=math.nan, t=math.nan, p=math.nan)
    elif n >= 2:
        sd = statistics.stdev(differences)
        # equal differences: t infinite with the mean's sign, or 0 where they are all 0 (no difference at all)
        t = (math.copysign(math.inf, mean) if mean else 0.0) if sd == 0 else mean / (sd / math.sqrt(n))
        result.update(sd=sd, t=t, p=(0.0 if mean else 1.0) if sd == 0 else t_two_sided_p(t, n - 1))
    return result


def runs_apart(a: list[float], b: list[float]) -> str:
    """Whether two labels' runs of an A/B are separated: "yes" where every run of one lies beyond every run of the
    other, "no" where their ranges overlap (the ratio of medians is then within the runs' own spread), "1 run" where
    a side has a single run (nothing to say). With two or three runs a side this is the least a reader should ask of a
    ratio before believing it; it is no significance test."""
    if len(a) < 2 or len(b) < 2:
        return "1 run"
    return "yes" if max(a) < min(b) or max(b) < min(a) else "no"
