"""The TRM reasoning network (the reference's `TinyRecursiveReasoningModel_ACTV1_Inner`).

Weights are a plain dict pytree:
  params      dense trainable weights (optimizer + EMA); per-layer weights stacked on axis 0
  puzzle_emb  [num_puzzle_identifiers, puzzle_dim] table, trained by sparse sign-SGD (absent if dim 0)
  z_init      {"H": [hidden], "L": [hidden]} initial recursion states, never trained
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from kellen.model.config import TRMConfig
from kellen.model.layers import attention, linear, rms_norm, rope_tables, swiglu, trunc_normal

Weights = Dict[str, Any]


def dtype_of(cfg: TRMConfig):
    return jnp.dtype(cfg.forward_dtype)


def init_weights(cfg: TRMConfig, key) -> Weights:
    """Reference init: truncated LeCun normal kernels, zero puzzle table, q head at (0, -5)."""
    cfg.validate()
    d, n = cfg.hidden_size, cfg.L_layers
    keys = iter(jax.random.split(key, 16))
    lecun = lambda shape: trunc_normal(next(keys), shape, 1.0 / math.sqrt(shape[-2]))
    blocks = {}
    if cfg.mlp_t:
        t, inner_t = cfg.total_len, cfg.swiglu_inner(cfg.total_len)
        blocks["mlp_t_gate_up"] = lecun((n, t, 2 * inner_t))
        blocks["mlp_t_down"] = lecun((n, inner_t, t))
    else:
        blocks["attn_qkv"] = lecun((n, d, 3 * d))
        blocks["attn_out"] = lecun((n, d, d))
    inner = cfg.swiglu_inner(d)
    blocks["mlp_gate_up"] = lecun((n, d, 2 * inner))
    blocks["mlp_down"] = lecun((n, inner, d))

    params = {
        "embed_tokens": trunc_normal(next(keys), (cfg.vocab_size, d), 1.0 / math.sqrt(d)),
        "lm_head": lecun((d, cfg.vocab_size)),
        "q_head": {"kernel": jnp.zeros((d, 2), jnp.float32), "bias": jnp.full((2,), -5.0, jnp.float32)},
        "blocks": blocks,
    }
    if cfg.pos_encodings == "learned":
        params["embed_pos"] = trunc_normal(next(keys), (cfg.total_len, d), 1.0 / math.sqrt(d))
    weights = {
        "params": params,
        "z_init": {"H": trunc_normal(next(keys), (d,), 1.0, dtype_of(cfg)),
                   "L": trunc_normal(next(keys), (d,), 1.0, dtype_of(cfg))},
    }
    if cfg.puzzle_dim > 0:
        weights["puzzle_emb"] = jnp.zeros((cfg.num_puzzle_identifiers, cfg.puzzle_dim), jnp.float32)
    return weights


def weight_shapes(cfg: TRMConfig) -> Weights:
    """Shapes and dtypes of `init_weights(cfg, key)`, without allocating anything."""
    return jax.eval_shape(lambda k: init_weights(cfg, k), jax.random.PRNGKey(0))


def input_embeddings(cfg: TRMConfig, params, inputs, puzzle_rows: Optional[jax.Array]):
    """Token embeddings with the puzzle prefix, optional learned positions, scaled by sqrt(hidden)."""
    dt = dtype_of(cfg)
    emb = params["embed_tokens"].astype(dt)[inputs.astype(jnp.int32)]
    if cfg.puzzle_dim > 0:
        b = inputs.shape[0]
        pe = puzzle_rows.astype(dt)
        pad = cfg.prefix_len * cfg.hidden_size - cfg.puzzle_dim
        if pad > 0:
            pe = jnp.pad(pe, ((0, 0), (0, pad)))
        emb = jnp.concatenate([pe.reshape(b, cfg.prefix_len, cfg.hidden_size), emb], axis=1)
    if cfg.pos_encodings == "learned":
        emb = 0.707106781 * (emb + params["embed_pos"].astype(dt))  # keeps the forward variance
    return math.sqrt(cfg.hidden_size) * emb


def _block(cfg: TRMConfig, w, h, rope):
    """Post-norm block: (attention | sequence-axis SwiGLU), then SwiGLU."""
    eps = cfg.rms_norm_eps
    if cfg.mlp_t:
        ht = jnp.swapaxes(h, 1, 2)  # [B, D, T]: the MLP mixes positions; the norm is over T too
        ht = rms_norm(ht + swiglu(ht, w["mlp_t_gate_up"], w["mlp_t_down"]), eps)
        h = jnp.swapaxes(ht, 1, 2)
    else:
        h = rms_norm(h + attention(h, w["attn_qkv"], w["attn_out"], cfg.num_heads, rope), eps)
    return rms_norm(h + swiglu(h, w["mlp_gate_up"], w["mlp_down"]), eps)


def reasoning_module(cfg: TRMConfig, blocks, h, injection, rope, unroll: bool = False):
    """The single L-level module used for both z_L and z_H updates; scans the stacked layers."""
    def body(carry, layer_w):
        return _block(cfg, layer_w, carry, rope), None

    h, _ = jax.lax.scan(body, h + injection, blocks, unroll=unroll)
    return h


def _recursion_cycle(cfg, blocks, z_H, z_L, emb, rope, unroll: bool = False):
    """L_cycles z_L updates, then one z_H update.

    `unroll` is for the differentiated cycle: a rolled loop under autodiff stacks every
    iteration's residuals with dynamic-update-slices and reads them back with dynamic-slices,
    which cost ~20% of a CPU step (bench/RESULTS.md); unrolled, XLA keeps them as plain buffers.
    The forward-only cycles stay rolled so compile time stays flat in H_cycles.
    """
    def update_L(_, zl):
        return reasoning_module(cfg, blocks, zl, z_H + emb, rope, unroll)

    z_L = jax.lax.fori_loop(0, cfg.L_cycles, update_L, z_L, unroll=unroll)
    z_H = reasoning_module(cfg, blocks, z_H, z_L, rope, unroll)
    return z_H, z_L


def inner_forward(cfg: TRMConfig, params, z_H, z_L, inputs, puzzle_rows):
    """One ACT step of recursion: H_cycles-1 cycles without gradient, then one with.

    Returns (z_H, z_L, logits [B, seq_len, vocab], q_halt [B] f32, q_continue [B] f32);
    the returned z's carry no gradient.
    """
    rope = None
    if cfg.pos_encodings == "rope" and not cfg.mlp_t:
        rope = rope_tables(cfg.total_len, cfg.head_dim, cfg.rope_theta)
    emb = input_embeddings(cfg, params, inputs, puzzle_rows)
    blocks = params["blocks"]

    if cfg.H_cycles > 1:
        # Cut the graph at the inputs so autodiff never traces tangents through these cycles.
        sg = jax.lax.stop_gradient
        ng_blocks, ng_emb = sg(blocks), sg(emb)
        z_H, z_L = jax.lax.fori_loop(
            0, cfg.H_cycles - 1,
            lambda _, z: _recursion_cycle(cfg, ng_blocks, z[0], z[1], ng_emb, rope), (sg(z_H), sg(z_L)))
        z_H, z_L = sg(z_H), sg(z_L)
    z_H, z_L = _recursion_cycle(cfg, blocks, z_H, z_L, emb, rope, unroll=True)

    logits = linear(z_H, params["lm_head"])[:, cfg.prefix_len:]
    q = linear(z_H[:, 0], params["q_head"]["kernel"], params["q_head"]["bias"])
    q = q.astype(jnp.promote_types(q.dtype, jnp.float32))
    return jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L), logits, q[..., 0], q[..., 1]
