"""TRM building blocks as pure functions over parameter arrays.

Weights are stored in JAX layout ([in, out] kernels). Every op casts weights to the
activation dtype, as the reference's CastedLinear/CastedEmbedding do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Std of a standard normal truncated to [-2, 2]; dividing by it makes the truncated
# sample's std equal the requested one (the reference's trunc_normal_init_).
_TRUNC_STD = 0.87962566103423978


def trunc_normal(key, shape, std: float, dtype=jnp.float32):
    if std == 0:
        return jnp.zeros(shape, dtype)
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * (std / _TRUNC_STD)).astype(dtype)


def rms_norm(x, eps: float):
    """Parameter-free RMS norm over the last axis, computed in float32 (or wider)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def linear(x, kernel, bias=None):
    y = x @ kernel.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


def swiglu(x, gate_up, down):
    """SwiGLU with fused [in, 2*inner] gate/up kernel: gate is the first half."""
    gate, up = jnp.split(linear(x, gate_up), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, down)


def rope_tables(total_len: int, head_dim: int, theta: float):
    """cos/sin tables [total_len, head_dim] in float32, halves duplicated (rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.outer(np.arange(total_len, dtype=np.float32), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x: [..., S, D] with cos/sin [S, D]; rotation done in float32 then cast back, like the reference."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    out = x * cos + _rotate_half(x) * sin
    return out.astype(dtype)


def attention(x, qkv_kernel, out_kernel, num_heads: int, rope):
    """Non-causal multi-head self-attention; qkv kernel packs [q heads | k heads | v heads].

    Heads are moved next to the batch ([B, H, S, D]) so both attention matmuls are plain
    batched matmuls; on XLA:CPU that is ~1.1x faster per step than jax.nn.dot_product_attention's
    [B, S, H, D] einsums (bench/RESULTS.md). Scores and softmax are float32, as in SDPA.
    """
    b, s, _ = x.shape
    qkv = linear(x, qkv_kernel).reshape(b, s, 3, num_heads, -1)
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [B, H, S, D]
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, v)
    return linear(out.reshape(b, s, -1), out_kernel)
