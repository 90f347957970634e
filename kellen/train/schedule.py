"""Learning-rate schedules matching the reference TRM `pretrain.py`.

The reference increments its step counter before computing the LR, so the first
update runs at step 1 (LR = base/warmup, never 0). `make_schedule` bakes that in
for optax, whose schedule count is 0 at the first update.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

LR_SCHEDULES = ("cosine", "linear", "constant")


def _check_kind(kind: str) -> None:
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={kind!r} must be one of {', '.join(LR_SCHEDULES)}")


def lr_multiplier(kind: str, step, *, warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier (base_lr = 1) at reference step `step` (1 = first update).

    All kinds share the linear warmup step/max(1, warmup). After warmup:
      cosine:   min_ratio + max(0, (1-min_ratio) * 0.5 * (1 + cos(pi * progress)))
                with progress = (step-warmup)/max(1, total-warmup) NOT clamped, exactly
                as the reference (num_cycles=0.5): past total_steps it rises again.
      linear:   1 -> min_ratio linearly over total-warmup, then held at min_ratio.
      constant: 1.
    `step` may be a Python number or a traced int/float; the result is float32.
    """
    _check_kind(kind)
    step = jnp.asarray(step, jnp.float32)
    warmup = float(warmup_steps)
    warm = step / max(1.0, warmup)
    progress = (step - warmup) / max(1.0, float(total_steps) - warmup)
    if kind == "cosine":
        num_cycles = 0.5  # the reference default; kept literal so the formula reads 1:1
        after = min_ratio + jnp.maximum(
            0.0, (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * num_cycles * 2.0 * progress))
        )
    elif kind == "linear":
        after = 1.0 - (1.0 - min_ratio) * jnp.clip(progress, 0.0, 1.0)
    else:
        after = jnp.ones_like(step)
    return jnp.where(step < warmup, warm, after).astype(jnp.float32)


def make_schedule(
    kind: str, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float
) -> Callable:
    """optax schedule `count -> lr`; count 0 (first update) maps to reference step 1."""
    _check_kind(kind)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return base_lr * lr_multiplier(
            kind, step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio
        )

    return schedule
