"""Benchmark: how long the training loop is blocked per async checkpoint save.

Paper config (hidden 512, H3/L6, L_layers 2, bf16; the puzzle table has --puzzles rows, 1 for
Sudoku), global batch 768 so the
ACT carry is full size; params + adam_atan2 state + EMA + carry. Times `Checkpointer.save`
(the blocking part: handing arrays to the background writer) and the full write.

    .venv/bin/python bench/checkpoint_stall.py [--dir /tmp/ckpt-bench] [--saves 3] [--puzzles 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kellen.model.config import TRMConfig  # noqa: E402
from kellen.train.checkpoint import Checkpointer  # noqa: E402
from kellen.train.step import OptimConfig, init_train_state  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--batch", type=int, default=768)
    ap.add_argument("--puzzles", type=int, default=1)
    args = ap.parse_args()
    cfg = TRMConfig(seq_len=81, vocab_size=11, num_puzzle_identifiers=args.puzzles)
    b = args.batch
    ex = {"inputs": jnp.zeros((b, 81), jnp.int32), "labels": jnp.zeros((b, 81), jnp.int32),
          "puzzle_identifiers": jnp.zeros((b,), jnp.int32)}
    state = jax.jit(lambda k: init_train_state(cfg, OptimConfig(ema=True), 1000, k, ex))(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    directory = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    saver = Checkpointer(directory, every_steps=None, keep=2)
    rng = jax.random.key_data(jax.random.PRNGKey(0))
    stalls, totals = [], []
    for i in range(args.saves):
        t = time.perf_counter()
        saver.save(i + 1, state, rng, {"step": i + 1}, force=True)
        stalls.append(time.perf_counter() - t)
        saver.wait()
        totals.append(time.perf_counter() - t)
    saver.close()
    print(f"state {nbytes / 2**20:.0f} MiB ({jax.default_backend()}, batch {b}); "
          f"loop blocked per save: {', '.join(f'{s:.3f}' for s in stalls)} s; "
          f"full write: {', '.join(f'{s:.2f}' for s in totals)} s")
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
