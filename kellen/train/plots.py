"""PNG plots of a run's metrics rows (see summary.py for row kinds and deduplication).

Figures are built as bare matplotlib.figure.Figure objects drawn by FigureCanvasAgg: no pyplot,
so no display, no global figure registry (nothing to leak when called at every eval) and no
shared state between threads.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from kellen.train.summary import dedupe, eval_sets, row_kind

Series = Tuple[str, List[float], List[float]]  # (label, x, y)


def _series(rows: List[Dict[str, Any]], x_key: str, y_key: str,
            scale: float = 1.0) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) \
                and not isinstance(x, bool) and not isinstance(y, bool):
            xs.append(x / scale)
            ys.append(y)
    return xs, ys


def _save(series: List[Series], path: str, title: str, xlabel: str, ylabel: str,
          log_y: bool = False) -> Optional[str]:
    series = [s for s in series if s[1]]
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, xs, ys in series:
        # markers so a single point (one eval so far) is still visible
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    finite = [y for _, _, ys in series for y in ys if math.isfinite(y)]
    if log_y and finite and min(finite) > 0:
        ax.set_yscale("log")
        # plain numbers: the default "1.9x10^0" minor labels are long and push the ylabel out
        fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(fmt)
        # within one decade minor ticks are the only labels; beyond it they would crowd
        ax.yaxis.set_minor_formatter(fmt if max(finite) < 10 * min(finite) else NullFormatter())
    elif not log_y:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or series[0][0]:
        ax.legend(fontsize="small")
    # fixed margins: tight_layout would double the text-layout cost of every save
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    # Same dir + .png suffix so the format is inferred and os.replace is an atomic rename.
    tmp = f"{path[:-4]}.tmp{os.getpid()}-{threading.get_ident()}.png"
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _time_unit(rows: List[Dict[str, Any]]) -> Tuple[float, str]:
    elapsed = [r["elapsed"] for r in rows if isinstance(r.get("elapsed"), (int, float))]
    if elapsed and max(elapsed) >= 2 * 3600:
        return 3600.0, "hours"
    return 60.0, "minutes"


def write_plots(rows: Iterable[Dict[str, Any]], out_dir: str) -> List[str]:
    """loss_vs_step.png, loss_vs_time.png, eval_accuracy.png and lr.png in out_dir; a plot whose
    data is absent is skipped. Returns the paths written."""
    rows = dedupe(rows)
    train = [r for r in rows if row_kind(r) == "train"]
    evals = [r for r in rows if row_kind(r) == "eval"]
    sets = eval_sets(evals)
    os.makedirs(out_dir, exist_ok=True)
    scale, unit = _time_unit(rows)
    multi = len(sets) > 1 or (sets and sets[0] != "all")

    def losses(x_key: str, s: float = 1.0) -> List[Series]:
        out = [("train", *_series(train, x_key, "train/lm_loss", s))]
        out += [(f"eval {name}", *_series(evals, x_key, f"eval/{name}/lm_loss", s))
                for name in sets]
        return out

    acc: List[Series] = []
    for name in sets:
        tag = f"{name} " if multi else ""
        acc.append((f"{tag}accuracy", *_series(evals, "step", f"eval/{name}/accuracy")))
        acc.append((f"{tag}exact_accuracy", *_series(evals, "step", f"eval/{name}/exact_accuracy")))

    jobs = [
        ("loss_vs_step.png", losses("step"), "LM loss", "step", "lm_loss", True),
        ("loss_vs_time.png", losses("elapsed", scale), "LM loss vs wall-clock",
         f"elapsed ({unit})", "lm_loss", True),
        ("eval_accuracy.png", acc, "Eval accuracy", "step", "accuracy", False),
        ("lr.png", [("", *_series(train, "step", "train/lr"))], "Learning rate", "step", "lr",
         False),
    ]
    written = []
    for name, series, title, xlabel, ylabel, log_y in jobs:
        path = _save(series, os.path.join(out_dir, name), title, xlabel, ylabel, log_y)
        if path:
            written.append(path)
    return written
