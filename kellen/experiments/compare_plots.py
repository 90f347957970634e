"""The plots of `kellen compare` (matplotlib, Agg, PNG) and the model-size scaling fit.

  by_<variable>.png      final eval exact accuracy, accuracy, train−eval gap and examples/s
                         against each variable the group sweeps (categorical axis if not numeric)
  curves_steps.png       eval exact accuracy and train lm_loss of every run against steps
  curves_wallclock.png   the same against training wall-clock
  pareto.png             final eval exact accuracy against examples/s, frontier marked
  scaling_fit.png        model-size groups: accuracy against params with acc = a - b·params^-c
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

SIZE_KEYS = ("arch.hidden_size", "arch.L_layers", "arch.H_layers", "arch.expansion", "arch.num_heads")
PANELS = (("final_exact_accuracy", "final eval exact accuracy"), ("final_accuracy", "final eval accuracy"),
          ("train_eval_gap", "train − eval exact accuracy"), ("examples_per_sec", "examples / s"))
FIT_METRIC = "final_exact_accuracy"


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig, path: str, written: List[str]) -> None:
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"  # atomic: a reader never sees half a PNG
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    written.append(path)


def _by_variable(plt, variable: str, rows: List[Dict[str, Any]], out: str, written: List[str]) -> None:
    pts = [r for r in rows if r.get(variable) is not None]
    if not pts:
        return
    numeric = all(_num(r[variable]) is not None for r in pts)
    pts.sort(key=lambda r: r[variable] if numeric else str(r[variable]))
    labels = [str(r[variable]) for r in pts]
    xs = [r[variable] for r in pts] if numeric else list(range(len(pts)))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        ys = [_num(r.get(key)) for r in pts]
        good = [(x, y, r["run"]) for x, y, r in zip(xs, ys, pts) if y is not None]
        if good:
            ax.plot([g[0] for g in good], [g[1] for g in good], "o-")
            for x, y, name in good:
                ax.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if not numeric:
            ax.set_xticks(xs, labels, rotation=30, fontsize=7)
        elif len({x for x in xs if x > 0}) == len(xs) and max(xs) / max(min(xs), 1e-12) >= 8:
            ax.set_xscale("log")
        ax.set_xlabel(variable)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    _save(fig, os.path.join(out, f"by_{_safe(variable)}.png"), written)
    plt.close(fig)


def _curves(plt, runs, primary_of, x_key: str, xlabel: str, path: str, written: List[str]) -> None:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for run in runs:
        key = f"eval/{primary_of(run)}/exact_accuracy"
        ev = [(r[x_key], r[key]) for r in run.rows if _num(r.get(x_key)) is not None and _num(r.get(key)) is not None]
        tr = [(r[x_key], r["train/lm_loss"]) for r in run.rows
              if _num(r.get(x_key)) is not None and _num(r.get("train/lm_loss")) is not None]
        if ev:
            ax_acc.plot(*zip(*ev), marker=".", label=run.name)
        if tr:
            ax_loss.plot(*zip(*tr), label=run.name)
        drawn += bool(ev or tr)
    if not drawn:
        plt.close(fig)
        return
    ax_acc.set_title("eval exact accuracy", fontsize=9)
    ax_loss.set_title("train lm_loss", fontsize=9)
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    _save(fig, path, written)
    plt.close(fig)


def _pareto(plt, rows, path: str, written: List[str]) -> None:
    pts = [r for r in rows if _num(r.get("examples_per_sec")) is not None and _num(r.get(FIT_METRIC)) is not None]
    if len(pts) < 2:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r["examples_per_sec"] for r in pts], [r[FIT_METRIC] for r in pts], c="grey")
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["examples_per_sec"])
    ax.plot([r["examples_per_sec"] for r in front], [r[FIT_METRIC] for r in front], "o-", color="C3",
            label="Pareto frontier")
    for r in pts:
        ax.annotate(r["run"], (r["examples_per_sec"], r[FIT_METRIC]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("examples / s (mean over training)")
    ax.set_ylabel("final eval exact accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, written)
    plt.close(fig)


def is_size_group(group) -> bool:
    return any(v in SIZE_KEYS for v in group.variables)


def scaling_fit(points: List[Tuple[float, float]]) -> Dict[str, Any]:
    """Least-squares fit of acc = a - b·params^-c to (params, acc) points. Params are scaled to
    millions inside the fit (b in those units would be unreadable at params^-c), then b is
    reported for raw params."""
    import numpy as np
    from scipy.optimize import curve_fit

    pts = sorted((p, a) for p, a in points if p > 0)
    if len({p for p, _ in pts}) < 3:
        return {"metric": FIT_METRIC, "points": len(pts), "error": f"needs 3 runs with distinct params, has {len(pts)}"}
    x = np.array([p / 1e6 for p, _ in pts])
    y = np.array([a for _, a in pts])

    def f(m, a, b, c):
        return a - b * np.power(m, -c)

    try:
        (a, b, c), _ = curve_fit(f, x, y, p0=(min(1.0, y.max() + 0.05), 0.1, 0.5),
                                 bounds=([0.0, 0.0, 0.0], [2.0, np.inf, 5.0]), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        return {"metric": FIT_METRIC, "points": len(pts), "error": f"fit did not converge: {e}"}
    rmse = float(np.sqrt(np.mean((f(x, a, b, c) - y) ** 2)))
    return {"metric": FIT_METRIC, "points": len(pts), "a": float(a), "b": float(b * 1e6 ** c), "c": float(c),
            "b_per_million": float(b), "rmse": rmse, "formula": "acc = a - b*params^-c"}


def _scaling(plt, rows, path: str, written: List[str]) -> Dict[str, Any]:
    pts = [(float(r["params"]), r[FIT_METRIC]) for r in rows
           if _num(r.get("params")) is not None and _num(r.get(FIT_METRIC)) is not None]
    fit = scaling_fit(pts)
    if not pts:
        return fit
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([p for p, _ in pts], [a for _, a in pts], zorder=3, label="runs")
    if "error" not in fit:
        grid = np.geomspace(min(p for p, _ in pts) / 1.5, max(p for p, _ in pts) * 1.5, 100)
        ax.plot(grid, fit["a"] - fit["b"] * grid ** -fit["c"], "C3-",
                label=f"{fit['a']:.3f} − {fit['b']:.3g}·N^-{fit['c']:.3f}")
        ax.axhline(fit["a"], color="C3", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final eval exact accuracy")
    ax.set_title(fit.get("error", "scaling fit"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, written)
    plt.close(fig)
    return fit


def write_plots(group, runs, rows, out: str) -> Tuple[List[str], Optional[Dict[str, Any]]]:
    """Write every plot that has data into `out`; returns (paths written, scaling fit or None).
    Stale PNGs from an earlier report are removed so the dir shows only this report."""
    plt = _plt()
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):
        if old.endswith(".png"):
            os.remove(os.path.join(out, old))
    written: List[str] = []
    for v in group.variables:
        _by_variable(plt, v, rows, out, written)

    def primary(run):
        return run.summary.get("primary_set") or "all"

    _curves(plt, runs, primary, "step", "step", os.path.join(out, "curves_steps.png"), written)
    _curves(plt, runs, primary, "elapsed", "training wall-clock (s)", os.path.join(out, "curves_wallclock.png"), written)
    _pareto(plt, rows, os.path.join(out, "pareto.png"), written)
    fit = _scaling(plt, rows, os.path.join(out, "scaling_fit.png"), written) if is_size_group(group) else None
    return written, fit
