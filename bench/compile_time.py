"""Compile time of the full training step at the paper's TRM config (Sudoku-Extreme TRM-att):
H_cycles=3, L_cycles=6, L_layers=2, hidden 512, 8 heads, seq 81 + 16 puzzle tokens,
halt_max_steps=16, bfloat16, global batch 768, adam_atan2 + sign-SGD + EMA.

Also compiles H_cycles=6/L_cycles=12 to show compile time does not grow with recursion depth
(the cycles are lax loops, not a Python unroll).
Usage: python bench/compile_time.py [--batch 768]
"""
import argparse
import platform
import time

import jax
import jax.numpy as jnp

from kellen.model.config import TRMConfig
from kellen.train.step import OptimConfig, init_train_state, make_train_step


def compile_seconds(cfg: TRMConfig, batch_size: int) -> tuple:
    opt = OptimConfig(ema=True)
    batch = {"inputs": jax.ShapeDtypeStruct((batch_size, cfg.seq_len), jnp.int32),
             "labels": jax.ShapeDtypeStruct((batch_size, cfg.seq_len), jnp.int32),
             "puzzle_identifiers": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    state = jax.eval_shape(lambda k: init_train_state(
        cfg, opt, 100_000, k, {k2: jnp.zeros(v.shape, v.dtype) for k2, v in batch.items()}), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, opt, 100_000, batch_size), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, jax.random.PRNGKey(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=768)
    args = ap.parse_args()
    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.device_count()} "
          f"machine={platform.machine()} cpus={__import__('os').cpu_count()}")
    paper = TRMConfig(seq_len=81, vocab_size=11, num_puzzle_identifiers=1_000_001)
    for name, cfg in [("paper H3/L6", paper), ("deep H6/L12", paper.replace(H_cycles=6, L_cycles=12))]:
        trace, comp = compile_seconds(cfg, args.batch)
        print(f"{name:12s} batch {args.batch}: trace+lower {trace:6.2f}s  compile {comp:6.2f}s  total {trace + comp:6.2f}s")


if __name__ == "__main__":
    main()
