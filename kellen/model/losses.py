"""Losses and the ACT loss head (the reference's `models/losses.py`).

Precision: the reference computes stablemax in float64. TPUs have no float64, so we use the
widest float the process has enabled: float64 when `jax_enable_x64` is on, else float32.
Against a float64 computation, float32 stablemax cross-entropy stays within 1e-6 relative
error per token for logits of magnitude up to 1e3 (tests/test_losses.py checks this); the
log1p form below is what makes that hold for tiny losses.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

IGNORE_LABEL_ID = -100


def loss_float():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _stablemax_s(x):
    # s(x) = 1/(1-x) for x<0, x+1 otherwise; the reference's 1e-30 epsilon is below
    # float32 resolution for 1-x >= 1, so it is dropped.
    return jnp.where(x < 0, 1.0 / (1.0 - jnp.minimum(x, 0.0)), x + 1.0)


def _pick(logprobs, labels, mask):
    safe = jnp.where(mask, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logprobs, safe[..., None], axis=-1)[..., 0]
    return -jnp.where(mask, picked, 0.0)


def stablemax_cross_entropy(logits, labels, mask):
    """-log(s_y / sum_j s_j), written as log1p(sum_{j != y} s_j / s_y).

    The log1p form keeps float32 accurate in relative terms when the loss is tiny (the label
    dominates); log(s_y) - log(sum s) would lose it to cancellation.
    """
    s = _stablemax_s(logits.astype(loss_float()))
    safe = jnp.where(mask, labels, 0).astype(jnp.int32)
    is_label = jax.nn.one_hot(safe, s.shape[-1], dtype=bool)
    s_label = jnp.sum(jnp.where(is_label, s, 0.0), axis=-1)
    others = jnp.sum(jnp.where(is_label, 0.0, s), axis=-1)
    return jnp.where(mask, jnp.log1p(others / s_label), 0.0)


def softmax_cross_entropy(logits, labels, mask):
    return _pick(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels, mask)


LOSSES = {"stablemax_cross_entropy": stablemax_cross_entropy, "softmax_cross_entropy": softmax_cross_entropy}


def bce_with_logits(logits, targets):
    """Numerically stable binary cross-entropy on logits, per element."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def act_loss_head(loss_type: str, halted, steps, labels, outputs) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Total loss lm + 0.5*(q_halt + q_continue), summed over the batch, and summed metrics.

    Metrics count only rows that halted this step and have at least one valid label, so
    eval padding rows (all labels -100) never count.
    """
    logits = outputs["logits"]
    mask = labels != IGNORE_LABEL_ID
    loss_counts = mask.sum(-1)
    divisor = jnp.maximum(loss_counts, 1)[:, None].astype(jnp.float32)

    preds = jnp.argmax(logits, axis=-1)
    is_correct = mask & (preds == labels)
    seq_correct = is_correct.sum(-1) == loss_counts
    valid = halted & (loss_counts > 0)
    q_halt = outputs["q_halt_logits"]

    metrics = {
        "count": valid.sum(),
        "accuracy": jnp.where(valid, (is_correct.astype(jnp.float32) / divisor).sum(-1), 0.0).sum(),
        "exact_accuracy": (valid & seq_correct).sum(),
        "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_correct)).sum(),
        "steps": jnp.where(valid, steps, 0).sum(),
    }
    per_token = LOSSES[loss_type](logits, labels, mask)
    lm_loss = (per_token / divisor.astype(per_token.dtype)).sum()
    q_halt_loss = bce_with_logits(q_halt, seq_correct.astype(q_halt.dtype)).sum()
    total = lm_loss + 0.5 * q_halt_loss
    metrics["lm_loss"] = jax.lax.stop_gradient(lm_loss)
    metrics["q_halt_loss"] = jax.lax.stop_gradient(q_halt_loss)
    if "target_q_continue" in outputs:
        q_cont_loss = bce_with_logits(outputs["q_continue_logits"], outputs["target_q_continue"]).sum()
        total = total + 0.5 * q_cont_loss
        metrics["q_continue_loss"] = jax.lax.stop_gradient(q_cont_loss)
    outputs["preds"] = preds
    return total, metrics
