"""Evaluation over the whole test set, as the reference `evaluate` does it.

Each test batch starts from a fresh carry and runs ACT steps until every row halts (in eval a
row halts only at halt_max_steps); the metrics are those of the final step. Sums over all
batches are divided by the count of real rows (padding rows have no labels and never count).
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from kellen.model.act import act_step, initial_carry
from kellen.model.config import TRMConfig


def make_eval_step(cfg: TRMConfig) -> Callable:
    """eval_step(weights, batch) -> summed metrics of the halting step; jit it with shardings."""

    def eval_step(weights, batch):
        carry = initial_carry(cfg, batch)

        def body(_, c):
            return act_step(cfg, weights, c, batch, training=False)["carry"]

        carry = jax.lax.fori_loop(0, cfg.halt_max_steps - 1, body, carry)
        res = act_step(cfg, weights, carry, batch, training=False)
        return {k: v.astype(jnp.float32) for k, v in res["metrics"].items()}

    return eval_step


# Train metrics that are already final values, not sums over rows.
NOT_SUMS = ("grad_norm", "param_norm")


def normalise_train(metrics: Dict[str, float], global_batch_size: int) -> Dict[str, float]:
    """The reference's train logging: losses per global-batch row, the rest per counted row."""
    count = max(metrics.get("count", 0.0), 1.0)
    out = {f"train/{k}": v if k in NOT_SUMS else v / (global_batch_size if k.endswith("loss") else count)
           for k, v in metrics.items() if k != "count"}
    out["train/count"] = metrics.get("count", 0.0)
    return out


def normalise_eval(sums: Dict[str, float], set_name: str) -> Dict[str, float]:
    """The reference's eval reduction: every metric divided by the count of evaluated rows."""
    count = max(sums.get("count", 0.0), 1.0)
    out = {f"eval/{set_name}/{k}": v / count for k, v in sums.items() if k != "count"}
    out[f"eval/{set_name}/count"] = sums.get("count", 0.0)
    return out
