"""A console progress line with loss, rate and ETA: rich on a terminal, plain lines in a log."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int, enabled: bool = True, plain_every_s: float = 30.0, log=None):
        """`log(line, echo)` receives the plain line (every plain_every_s, the first and the last
        step) for the run's train.log; echo is False while the rich bar shows it on the terminal."""
        self.total, self.start, self.enabled = total, start, enabled
        self.log = log or (lambda line, echo=True: print(line, flush=True) if echo else None)
        self.t0, self.last_plain, self.plain_every_s = time.time(), 0.0, plain_every_s
        self._bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, \
                TimeRemainingColumn
            self._bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (step - self.start) / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        info = (f"loss {row.get('train/lm_loss', float('nan')):.4f} acc {row.get('train/accuracy', 0):.3f} "
                f"exact {row.get('train/exact_accuracy', 0):.3f} | {rate:.2f} steps/s")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        if time.time() - self.last_plain >= self.plain_every_s or step == self.total or step == self.start + 1:
            self.last_plain = time.time()
            self.log(f"step {step}/{self.total} | {info} | ETA {_fmt(eta)}", self._bar is None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
