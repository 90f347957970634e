"""EMA of parameters with the reference `EMAHelper` semantics.

shadow <- (1 - rate) * param + rate * shadow, computed in float32 and cast back to
each leaf's dtype. The EMA covers the dense trainable params only: the caller
excludes the puzzle-embedding table and the H_init/L_init buffers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_init(params):
    """A copy of `params` to start the shadow from."""
    return jax.tree.map(lambda p: jnp.array(p, copy=True), params)


def ema_update(ema, params, rate):
    """One EMA step; `rate` is the reference's mu (e.g. 0.999) and may be traced."""
    rate = jnp.asarray(rate, jnp.float32)

    def step(shadow, p):
        new = (1.0 - rate) * p.astype(jnp.float32) + rate * shadow.astype(jnp.float32)
        return new.astype(shadow.dtype)

    return jax.tree.map(step, ema, params)
