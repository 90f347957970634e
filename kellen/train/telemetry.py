"""`perf/` metrics: throughput, model TFLOP/s per device, MFU, device memory; parameter counts.

Throughput is measured between logged steps on the host clock, so it costs no device sync
beyond the metric fetch that `log_every` already asks for; evaluation time is excluded by
restarting the clock after each eval.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import jax
import numpy as np


def count_params(weights) -> int:
    """Trainable parameters: the dense params and the puzzle-embedding table."""
    trees = [weights["params"]] + ([weights["puzzle_emb"]] if "puzzle_emb" in weights else [])
    return int(sum(math.prod(x.shape) for t in trees for x in jax.tree_util.tree_leaves(t)))


class StepTimer:
    def __init__(self, global_batch: int, seq_len: int, step_flops: int, num_devices: int,
                 peak_tflops: Optional[float]):
        self.global_batch, self.seq_len = global_batch, seq_len
        self.step_flops, self.num_devices, self.peak = step_flops, num_devices, peak_tflops
        self.mark_step, self.mark_time = 0, time.perf_counter()

    def restart(self, step: int) -> None:
        """Start a new interval at `step` (after compiling, an eval or a checkpoint restore)."""
        self.mark_step, self.mark_time = step, time.perf_counter()

    def perf(self, step: int) -> Dict[str, float]:
        """Rates over the steps since the last call (or restart); {} if no step was taken."""
        now = time.perf_counter()
        steps = step - self.mark_step
        if steps <= 0:
            return {}
        step_time = (now - self.mark_time) / steps
        self.mark_step, self.mark_time = step, now
        tflops = self.step_flops / step_time / 1e12 / self.num_devices
        out = {"perf/step_time": step_time, "perf/examples_per_sec": self.global_batch / step_time,
               "perf/tokens_per_sec": self.global_batch * self.seq_len / step_time,
               "perf/model_tflops_per_device": tflops}
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        out.update(memory_stats())
        return out


def memory_stats() -> Dict[str, float]:
    """Bytes in use and peak on this process's first device, in GiB; {} where the backend has
    no allocator stats (XLA:CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return {}
    if not stats:
        return {}
    out = {}
    for key, name in (("bytes_in_use", "perf/memory_in_use_gib"), ("peak_bytes_in_use", "perf/memory_peak_gib")):
        if key in stats:
            out[name] = float(np.float64(stats[key]) / 2 ** 30)
    return out
