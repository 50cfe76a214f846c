"""Token colours by the model's probability (the ``p`` key): red (unlikely) through
yellow to green (likely), in 11 buckets, so a token view can cache one style per bucket."""

from __future__ import annotations

import math

from rich.style import Style


def _prob_styles() -> list[Style]:
    out = []
    for i in range(11):
        p = i / 10
        r = int(255 * min(1.0, 2 * (1 - p)))
        g = int(200 * min(1.0, 2 * p))
        out.append(Style(color=f"rgb({r},{g},60)"))
    return out


PROB_STYLES = _prob_styles()  # bucket -> style


def prob_bucket(logprob: float | None) -> int | None:
    """The bucket (0..10) of a token's probability; None when there is none."""
    if logprob is None:
        return None
    return max(0, min(10, int(round(math.exp(logprob) * 10))))
