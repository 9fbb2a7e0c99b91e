"""Confidence intervals for the rates erasekit reports (target rates, ASR, preservation accuracy)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a rate of successes out of n.

    n = 0 gives (0.0, 1.0): no evidence, every rate possible. successes may be fractional: for a mean of
    per-image scores in [0, 1] (preservation accuracy averages attributes per image) pass mean x n; the
    interval is then conservative, since such a mean's variance is at most p(1 - p) / n."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_ci(rate: float | None, n: int, digits: int = 4) -> list[float] | None:
    """The rounded [lo, hi] interval of a reported rate (a share of n), or None when there is no rate."""
    if rate is None:
        return None
    lo, hi = wilson(min(max(rate, 0.0), 1.0) * n, n)
    scale = 10**digits  # rounded outwards, so the rounded interval still holds the rate
    return [round(math.floor(lo * scale) / scale, digits), round(math.ceil(hi * scale) / scale, digits)]


def format_rate(rate: float | None, ci: list[float] | None = None, n: int | None = None, digits: int = 2) -> str:
    """'0.31 [0.18, 0.47], n=32' (as the reports show a rate; the rate itself to `digits` places); '–' when there
    is no rate."""
    if rate is None:
        return "–"
    text = f"{rate:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if n is not None:
        text += f", n={n}"
    return text
