"""What ``bench``, ``loadtest`` and ``eval`` share to report numbers: percentiles and summaries that skip missing
values, number formatting, markdown tables, JSON without NaN, matplotlib figures saved as PNG, and the check
that an optional extra (matplotlib) is installed before any slow work starts."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAN = float("nan")


def finite(values: Iterable[Any]) -> list[float]:
    """The values that are finite numbers (a response that produced no audio reports NaN or None)."""
    return [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def percentile(values: Iterable[Any], q: float, empty: float | None = NAN) -> float | None:
    v = finite(values)
    return float(np.percentile(np.asarray(v, dtype=np.float64), q)) if v else empty


def mean(values: Iterable[Any], empty: float | None = NAN) -> float | None:
    v = finite(values)
    return float(np.mean(v)) if v else empty


def distribution(values: Iterable[Any], quantiles: Sequence[float] = (50, 90, 99),
                 stats: Sequence[str] = ("mean", "min", "max"), empty: float | None = NAN) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "mean": ..., "min": ..., "max": ...}`` over the finite values; ``empty`` for
    each when there are none."""
    v = finite(values)
    out: dict[str, float | None] = {f"p{q:g}": percentile(v, q, empty) for q in quantiles}
    funcs = {"mean": np.mean, "min": np.min, "max": np.max}
    for name in stats:
        out[name] = float(funcs[name](v)) if v else empty
    return out


def fmt(x: float | None, digits: int = 1, missing: str = "—", unit: str = "") -> str:
    """``x`` with ``digits`` decimals (and ``unit``), or ``missing`` for None and NaN."""
    if x is None or (isinstance(x, float) and x != x):
        return missing
    return f"{x:.{digits}f}{unit}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | Sequence[str] = "---") -> str:
    """A markdown table; ``align`` is one marker for every column (``---``, ``---:``, ``:---``) or one each.
    Cells are written with ``str``; a ``|`` inside a cell becomes ``/``."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    if len(aligns) != len(header):
        raise ValueError(f"{len(header)} columns but {len(aligns)} alignments")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def jsonable(x: Any) -> Any:
    """NaN and infinities as null, tuples as lists, paths and anything else odd as strings: ready for
    ``json.dumps(..., allow_nan=False)``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


class MissingExtra(RuntimeError):
    """An optional dependency a command needs is not installed."""


def require(modules: Sequence[str], extra: str, command: str) -> None:
    """Raise ``MissingExtra`` naming every module of ``modules`` that is not installed and the extra that brings
    them; commands call this before they load a model or measure anything."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"openchroma {command} needs {', '.join(missing)}: pip install 'openchroma[{extra}]'")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> str:
    """Lay out, write ``path`` (PNG) and free the figure; the file's name."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path).name


def plot_cdf(ax, values: Iterable[Any], **style) -> None:
    """The empirical CDF of the finite values as a step line."""
    v = sorted(finite(values))
    if v:
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", **style)
