"""One training step: ACT forward/backward, optimizer on dense params, sign-SGD on the puzzle
table, EMA. Mirrors the reference `train_batch` (loss scaled by 1/global_batch_size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from kellen.model.act import act_step, initial_carry
from kellen.model.config import TRMConfig
from kellen.model.trm import init_weights
from kellen.train.ema import ema_init, ema_update
from kellen.train.optimizers import build_optimizer
from kellen.train.puzzle_emb import sparse_signsgd_update
from kellen.train.schedule import lr_multiplier

TrainState = Dict[str, Any]  # weights, opt_state, ema (or None), carry, step


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam_atan2"
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    lr_schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    ema: bool = False
    ema_rate: float = 0.999


def _multiplier(opt: OptimConfig, total_steps: int):
    # The reference counts the update being applied from 1 (step += 1 before the LR).
    return lambda step: lr_multiplier(opt.lr_schedule, step, warmup_steps=opt.lr_warmup_steps,
                                      total_steps=total_steps, min_ratio=opt.lr_min_ratio)


def make_optimizer(opt: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    mult = _multiplier(opt, total_steps)
    return build_optimizer(opt.optimizer, lambda count: opt.lr * mult(count + 1),
                           beta1=opt.beta1, beta2=opt.beta2, weight_decay=opt.weight_decay)


def init_train_state(cfg: TRMConfig, opt: OptimConfig, total_steps: int, key, example_batch) -> TrainState:
    weights = init_weights(cfg, key)
    return {
        "weights": weights,
        "opt_state": make_optimizer(opt, total_steps).init(weights["params"]),
        "ema": ema_init(weights["params"]) if opt.ema else None,
        "carry": initial_carry(cfg, example_batch),
        "step": jnp.zeros((), jnp.int32),
    }


def make_train_step(cfg: TRMConfig, opt: OptimConfig, total_steps: int, global_batch_size: int,
                    fault_nan_at_step: Optional[int] = None):
    """Returns train_step(state, batch, rng) -> (state, loss, metrics); jit it with shardings.
    `fault_nan_at_step=k` (a testing hook) makes update k (the one that ends at step k) produce a NaN
    loss and NaN gradients, as a diverged step would; None traces exactly the plain step."""
    optimizer = make_optimizer(opt, total_steps)
    mult = _multiplier(opt, total_steps)

    def train_step(state: TrainState, batch, rng):
        weights = state["weights"]
        res = act_step(cfg, weights, state["carry"], batch, training=True, rng=rng, with_grads=True)
        if fault_nan_at_step is not None:
            res = _inject_nan(res, state["step"] + 1 == fault_nan_at_step)
        scale = 1.0 / global_batch_size
        g_params = jax.tree_util.tree_map(lambda g: g * scale, res["grads"]["params"])
        updates, opt_state = optimizer.update(g_params, state["opt_state"], weights["params"])
        new_weights = dict(weights, params=optax.apply_updates(weights["params"], updates))
        if "puzzle_emb" in weights:
            lr = opt.puzzle_emb_lr * mult(state["step"] + 1)
            new_weights["puzzle_emb"] = sparse_signsgd_update(
                weights["puzzle_emb"], res["carry"].data["puzzle_identifiers"],
                res["grads"]["puzzle_rows"] * scale, lr, opt.puzzle_emb_weight_decay)
        ema = state["ema"]
        if ema is not None:
            ema = ema_update(ema, new_weights["params"], opt.ema_rate)
        new_state = {"weights": new_weights, "opt_state": opt_state, "ema": ema,
                     "carry": res["carry"], "step": state["step"] + 1}
        # Norms of the dense params' (batch-mean) gradient and of the updated params, for logging.
        metrics = dict(res["metrics"], grad_norm=optax.global_norm(g_params),
                       param_norm=optax.global_norm(new_weights["params"]))
        return new_state, res["loss"], metrics

    return train_step


def _inject_nan(res, now):
    """The fault_nan_at_step hook: when `now`, the loss, its logged parts and every gradient are NaN."""
    factor = jnp.where(now, jnp.nan, 1.0)
    metrics = {k: v * factor.astype(v.dtype) if k.endswith("loss") else v for k, v in res["metrics"].items()}
    grads = jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), res["grads"])
    return dict(res, loss=res["loss"] * factor.astype(res["loss"].dtype), metrics=metrics, grads=grads)
