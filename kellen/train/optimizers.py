"""Optimizers for the dense TRM parameters, as optax transformations.

`adam_atan2` reproduces the fused CUDA kernel of the `adam-atan2` package that the
reference TRM trains with (per element, step t starting at 1):

    p *= 1 - lr*wd
    m += (1-b1)*(g - m);  v += (1-b2)*(g*g - v)
    p -= (lr / (1-b1**t)) * atan2(m, sqrt(v) / sqrt(1-b2**t))

Expressed as an optax delta that is  -lr*wd*p_old - (lr/bc1)*atan2(...), i.e. the
decay term uses the parameters passed to `update`, as the kernel does.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam_atan2", "adam", "adamw", "lion")

ScalarOrSchedule = Union[float, Callable]


class ScaleByAdamAtan2State(NamedTuple):
    count: jax.Array  # int32 number of updates applied so far
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_atan2(b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """Direction atan2(m, sqrt(v)/sqrt(bc2)) / bc1, without LR or weight decay.

    Moments are float32 whatever the param dtype (the kernel's opmath), and the
    returned updates are float32 so `optax.apply_updates` rounds bf16 params once.
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return ScaleByAdamAtan2State(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1.0 - jnp.power(jnp.float32(b1), t)
        bc2_sqrt = jnp.sqrt(1.0 - jnp.power(jnp.float32(b2), t))
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        # lerp form, as the kernel writes it.
        mu = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.mu, g32)
        nu = jax.tree.map(lambda v, g: v + (1.0 - b2) * (g * g - v), state.nu, g32)
        direction = jax.tree.map(lambda m, v: jnp.arctan2(m, jnp.sqrt(v) / bc2_sqrt) / bc1, mu, nu)
        return direction, ScaleByAdamAtan2State(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_atan2(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1
) -> optax.GradientTransformation:
    """Adam-atan2 with decoupled weight decay; LR may be a float or a count->lr schedule.

    update = -lr * (direction + wd * params): the same lr scales the decay, so with a
    schedule the decay follows it exactly as the reference (which sets group lr each step).
    """
    return optax.chain(
        scale_by_adam_atan2(b1, b2),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _torch_adam(
    learning_rate: ScalarOrSchedule, b1: float, b2: float, weight_decay: float
) -> optax.GradientTransformation:
    # torch.optim.Adam's weight_decay is an L2 term added to the gradient before the
    # moments; optax.scale_by_adam's mu_hat/(sqrt(nu_hat)+eps) equals torch's
    # m/bc1 / (sqrt(v)/sqrt(bc2) + eps).
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
        optax.scale_by_learning_rate(learning_rate),
    )


def build_optimizer(
    name: str, learning_rate: ScalarOrSchedule, *, beta1: float, beta2: float, weight_decay: float
) -> optax.GradientTransformation:
    """Optimizer for the dense params by config name."""
    if name == "adam_atan2":
        return adam_atan2(learning_rate, b1=beta1, b2=beta2, weight_decay=weight_decay)
    if name == "adamw":
        return optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=1e-8, weight_decay=weight_decay)
    if name == "adam":
        return _torch_adam(learning_rate, beta1, beta2, weight_decay)
    if name == "lion":
        return optax.lion(learning_rate, b1=beta1, b2=beta2, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} must be one of {', '.join(OPTIMIZERS)}")
