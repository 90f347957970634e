"""Adaptive computation time around the TRM (the reference's `TinyRecursiveReasoningModel_ACTV1`).

One call of `act_step` is one supervision step: rows that halted last step restart from
z_init with the new batch's row; the others continue on the data they hold.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from kellen.model.config import TRMConfig
from kellen.model.losses import act_loss_head
from kellen.model.trm import Weights, dtype_of, inner_forward

Batch = Dict[str, jax.Array]  # inputs [B,S], labels [B,S], puzzle_identifiers [B]


class Carry(NamedTuple):
    z_H: jax.Array
    z_L: jax.Array
    steps: jax.Array  # int32 [B]
    halted: jax.Array  # bool [B]
    data: Batch


def initial_carry(cfg: TRMConfig, batch: Batch) -> Carry:
    """All rows halted, so the first step resets every row and takes the whole batch."""
    b = batch["inputs"].shape[0]
    z = jnp.zeros((b, cfg.total_len, cfg.hidden_size), dtype_of(cfg))
    return Carry(z, z, jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool),
                 {k: jnp.zeros_like(v) for k, v in batch.items()})


def refresh_carry(weights: Weights, carry: Carry, batch: Batch) -> Carry:
    """Reset halted rows to the init states and swap in the new batch's rows."""
    h = carry.halted
    z_init = weights["z_init"]
    z_H = jnp.where(h[:, None, None], z_init["H"].astype(carry.z_H.dtype), carry.z_H)
    z_L = jnp.where(h[:, None, None], z_init["L"].astype(carry.z_L.dtype), carry.z_L)
    data = {k: jnp.where(h.reshape((-1,) + (1,) * (v.ndim - 1)), batch[k], v) for k, v in carry.data.items()}
    return Carry(z_H, z_L, jnp.where(h, 0, carry.steps), h, data)


def puzzle_rows(weights: Weights, data: Batch) -> Optional[jax.Array]:
    if "puzzle_emb" not in weights:
        return None
    return weights["puzzle_emb"][data["puzzle_identifiers"].astype(jnp.int32)]


def act_forward(cfg: TRMConfig, params, rows, refreshed: Carry, *, training: bool,
                rng: Optional[jax.Array]) -> Tuple[Carry, Dict[str, jax.Array]]:
    """Model forward plus the halting decision, from a refreshed carry."""
    data = refreshed.data
    z_H, z_L, logits, q_halt, q_cont = inner_forward(cfg, params, refreshed.z_H, refreshed.z_L,
                                                     data["inputs"], rows)
    outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}

    steps = refreshed.steps + 1
    is_last = steps >= cfg.halt_max_steps
    halted = is_last
    if training and cfg.halt_max_steps > 1:
        sg = jax.lax.stop_gradient
        if cfg.no_ACT_continue:
            halted = halted | (sg(q_halt) > 0)
        else:
            halted = halted | (sg(q_halt) > sg(q_cont))
        # Exploration: with probability p a row must run at least U{2..max} steps.
        k_explore, k_min = jax.random.split(rng)
        explore = jax.random.uniform(k_explore, q_halt.shape) < cfg.halt_exploration_prob
        min_steps = explore * jax.random.randint(k_min, steps.shape, 2, cfg.halt_max_steps + 1)
        halted = halted & (steps >= min_steps)
        if not cfg.no_ACT_continue:
            # Bootstrapped Q target, HRM semantics (the TRM reference's version of this path
            # unpacks 5 values from a 3-tuple and cannot run): one more no-grad forward from
            # the new state; target = sigmoid(q_halt_next if last step else max(next q's)).
            _, _, _, nq_halt, nq_cont = inner_forward(cfg, sg(params), z_H, z_L, data["inputs"], sg(rows))
            outputs["target_q_continue"] = sg(jax.nn.sigmoid(
                jnp.where(is_last, nq_halt, jnp.maximum(nq_halt, nq_cont))))
    return Carry(z_H, z_L, steps, halted, data), outputs


def act_objective(params, rows, cfg: TRMConfig, refreshed: Carry, training: bool, rng):
    """Un-normalised loss of one ACT step; differentiable in params and the puzzle rows."""
    new_carry, outputs = act_forward(cfg, params, rows, refreshed, training=training, rng=rng)
    loss, metrics = act_loss_head(cfg.loss_type, new_carry.halted, new_carry.steps,
                                  new_carry.data["labels"], outputs)
    return loss, (new_carry, metrics, outputs)


def act_step(cfg: TRMConfig, weights: Weights, carry: Carry, batch: Batch, *, training: bool,
             rng: Optional[jax.Array] = None, with_grads: bool = False) -> Dict[str, Any]:
    """One supervision step. Returns carry, loss, metrics, outputs and (optionally) grads.

    grads = {"params": like weights["params"], "puzzle_rows": [B, puzzle_dim] or None}; the
    row gradient is per batch element (duplicate ids not yet summed).
    """
    refreshed = refresh_carry(weights, carry, batch)
    rows = puzzle_rows(weights, refreshed.data)
    if training and rng is None:
        raise ValueError("act_step(training=True) needs an rng for halting exploration")
    args = (cfg, refreshed, training, rng)
    if with_grads:
        fn = jax.value_and_grad(act_objective, argnums=(0, 1), has_aux=True)
        (loss, (new_carry, metrics, outputs)), (g_params, g_rows) = fn(weights["params"], rows, *args)
        grads = {"params": g_params, "puzzle_rows": g_rows}
    else:
        loss, (new_carry, metrics, outputs) = act_objective(weights["params"], rows, *args)
        grads = None
    return {"carry": new_carry, "loss": loss, "metrics": metrics, "outputs": outputs, "grads": grads}
