"""Analytic model FLOPs of a TRM training step, for throughput, TFLOP/s and MFU.

Used by the training loop's `perf/` metrics and by `bench/train_step.py`, which checks the count
against a walk over the step's jaxpr (every dot_general) and XLA's cost analysis.
"""
from __future__ import annotations


def block_flops(cfg, batch: int) -> dict:
    """Matmul FLOPs of one post-norm block's forward for `batch` rows, by term (2*m*n*k each)."""
    b, t, d = batch, cfg.total_len, cfg.hidden_size
    inner = cfg.swiglu_inner(d)
    terms = {}
    if cfg.mlp_t:
        inner_t = cfg.swiglu_inner(t)
        # x^T: [B, D, T] @ [T, 2*inner_t], then [B, D, inner_t] @ [inner_t, T]
        terms["mlp_t_gate_up"] = 2 * b * d * t * (2 * inner_t)
        terms["mlp_t_down"] = 2 * b * d * inner_t * t
    else:
        terms["attn_qkv"] = 2 * b * t * d * (3 * d)
        # scores q.k^T: per head [T, hd] x [hd, T]; values p.v: [T, T] x [T, hd]; summed over heads
        terms["attn_scores"] = 2 * b * cfg.num_heads * t * t * cfg.head_dim
        terms["attn_values"] = 2 * b * cfg.num_heads * t * t * cfg.head_dim
        terms["attn_out"] = 2 * b * t * d * d
    terms["mlp_gate_up"] = 2 * b * t * d * (2 * inner)
    terms["mlp_down"] = 2 * b * t * inner * d
    return terms


def model_flops(cfg, batch: int) -> dict:
    """Analytic model FLOPs of one training step (one ACT supervision step) of `kellen`'s TRM.

    Notation: B batch, T = cfg.total_len (seq_len + puzzle prefix), D hidden, I =
    swiglu_inner(D), I_t = swiglu_inner(T) (mlp_t only), V vocab, nh heads, hd = D/nh,
    n = L_layers. Every matmul counts 2*m*n*k.

    One block (forward), attention variant:
        qkv 2*B*T*D*3D + scores 2*B*nh*T*T*hd + values 2*B*nh*T*T*hd + out 2*B*T*D*D
        + SwiGLU gate/up 2*B*T*D*2I + down 2*B*T*I*D
    mlp_t variant (the attention is replaced by a SwiGLU over the sequence axis on x^T [B,D,T]):
        gate/up 2*B*D*T*2I_t + down 2*B*D*I_t*T  + the same channel SwiGLU as above.
    One reasoning-module call = n blocks. One H cycle = L_cycles z_L updates + 1 z_H update
    = (L_cycles + 1) module calls. Heads: lm_head 2*B*T*D*V (the code applies it to all T
    positions and slices the prefix off afterwards, so T, not seq_len) and q_head 2*B*D*2.

        forward  = H_cycles*(L_cycles+1)*n*block + heads
        backward = 2 * [(L_cycles+1)*n*block + heads]     (only the last H cycle and the heads
                                                           are differentiated; the first
                                                           H_cycles-1 cycles run forward only
                                                           under stop_gradient)
        total    = forward + backward

    Excluded: RMS norms, softmax, SiLU and other elementwise ops, RoPE, embedding gathers,
    the loss, the puzzle-embedding sign-SGD scatter, the optimizer and EMA updates (all
    O(params) or O(B*T*D) per op, not matmuls).
    """
    blk = block_flops(cfg, batch)
    per_block = sum(blk.values())
    b, t, d = batch, cfg.total_len, cfg.hidden_size
    heads = 2 * b * t * d * cfg.vocab_size + 2 * b * d * 2
    per_cycle = (cfg.L_cycles + 1) * cfg.L_layers * per_block
    forward = cfg.H_cycles * per_cycle + heads
    backward = 2 * (per_cycle + heads)
    # What XLA's HloCostAnalysis reports: it walks each while-loop body once, whatever the trip
    # count. The forward-only cycles are loops (one z_L and one z_H layer-loop body, one block
    # each); the differentiated cycle is unrolled, so its forward and backward count in full.
    bodies_once = 2 * (cfg.H_cycles > 1) * per_block + 3 * per_cycle + 3 * heads
    return {"block_terms": blk, "per_block": per_block, "per_H_cycle": per_cycle, "heads": heads,
            "forward": forward, "backward": backward, "total": forward + backward,
            "loop_bodies_once": bodies_once}


def train_step_flops(cfg, batch: int) -> int:
    """Model FLOPs of one training step (one ACT supervision step) at global batch `batch`."""
    return int(model_flops(cfg, batch)["total"])


def eval_step_flops(cfg, batch: int) -> int:
    """Model FLOPs of one evaluation batch: halt_max_steps forward-only ACT steps."""
    f = model_flops(cfg, batch)
    return int(cfg.halt_max_steps * f["forward"])


# Dense bf16 peak TFLOP/s per device, for MFU; device_kind as JAX reports it (lowercased prefix).
PEAK_TFLOPS = {"tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
               "tpu v6 lite": 918.0, "tpu v6e": 918.0, "nvidia h100": 989.0, "nvidia h200": 989.0,
               "nvidia a100": 312.0}


def peak_tflops(device_kind: str, configured=None):
    """The configured peak, else the table's for this device kind, else None (no MFU)."""
    if configured:
        return float(configured)
    kind = (device_kind or "").lower()
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_TFLOPS[prefix]
    return None
