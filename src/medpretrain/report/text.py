"""Number and label formatting shared by the report's tables, figures and sentences.

One place so that a value printed in the results table and the same value quoted in the recommendation
are rounded alike.
"""

from __future__ import annotations

import math


def fmt(x: float | None, digits: int = 3) -> str:
    """`x` rounded to `digits` decimals; "—" for a missing or non-finite value."""
    if x is None or not math.isfinite(x):
        return "—"
    return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0 turns a rounded -0.0 into 0.0: no "-0.000"


def short(text: str, n: int = 14) -> str:
    """`text` cut to `n` characters with an ellipsis (figure titles and legends have little room)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def about(x: float) -> str:
    """Two significant digits without scientific notation: 0.42, 7.5, 25, 120, 4500."""
    return f"{float(f'{x:.2g}'):g}"


def duration(seconds: float | None) -> str:
    """'1 h 05 min' or '3 min 07 s'; 'unknown' without a time."""
    if seconds is None:
        return "unknown"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"
