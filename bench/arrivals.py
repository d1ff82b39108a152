"""Request arrival processes: gamma-distributed gaps (burstiness 1 = Poisson), seeded.

Gaps have mean 1/rate and shape `burstiness`, so their coefficient of variation is
1/sqrt(burstiness): below 1 is burstier than Poisson, above 1 smoother. rate=inf sends
everything at once.
"""

from __future__ import annotations

import math
import random


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from start) of num requests."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.gammavariate(burstiness, scale)
        out.append(t)
    return out
