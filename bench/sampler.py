"""Benchmark: sampler batches/s against the training step rate.

Builds the paper's Sudoku training set shape (1,000 puzzles x 1,000 augmentations = 1,001,000
examples, int64 tokens memory-mapped, as the reference writes it), then times:
  * sequential training batches (global batch 768, the paper's), single process and one of 8;
  * a cold random access at step 60,000 (what a resumed run pays once);
  * the test walk;
  * the paper-config TRM train step on this machine's CPU at a small batch, for scale.

    .venv/bin/python bench/sampler.py [--steps 2000] [--skip-train-step]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kellen.data import format as fmt, sudoku  # noqa: E402
from kellen.data.sampler import TrainSampler, eval_batches  # noqa: E402
from kellen.data.sudoku_gen import generate_sudoku  # noqa: E402


def build(root: str) -> None:
    rows = generate_sudoku(50, seed=0, min_clues=30)
    q = np.array([[0 if c == "." else int(c) for c in r[0]] for r in rows], np.uint8)
    a = np.array([[int(c) for c in r[1]] for r in rows], np.uint8)
    q, a = np.tile(q, (20, 1)), np.tile(a, (20, 1))  # 1,000 puzzles; content does not matter here
    rng = np.random.default_rng(0)
    fmt.write_split(os.path.join(root, "train"), *sudoku.build_split(q, a, 1000, rng))
    fmt.write_split(os.path.join(root, "test"), *sudoku.build_split(np.tile(q, (100, 1)), np.tile(a, (100, 1)), 0, rng))


def rate(fn, n):
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def train_step_rate(batch: int, steps: int = 3) -> float:
    import jax

    from kellen.model.config import TRMConfig
    from kellen.train.step import OptimConfig, init_train_state, make_train_step

    cfg = TRMConfig(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, forward_dtype="float32")
    opt = OptimConfig()
    key = jax.random.PRNGKey(0)
    ex = {"inputs": np.ones((batch, 81), np.int32), "labels": np.ones((batch, 81), np.int32),
          "puzzle_identifiers": np.zeros(batch, np.int32)}
    state = init_train_state(cfg, opt, 1000, key, ex)
    step = jax.jit(make_train_step(cfg, opt, 1000, batch))
    state, loss, _ = step(state, ex, key)
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for i in range(steps):
        state, loss, _ = step(state, ex, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--skip-train-step", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        build(root)
        train = fmt.load_split(root, "train")
        test = fmt.load_split(root, "test")
        data = train.only_set()
        print(f"train: {data.num_examples:,} examples, inputs {data.inputs.dtype} memory-mapped")
        s = TrainSampler(data, train.meta, 768, seed=0, epochs_per_iter=2000)
        print(f"global batch 768, 1 process : {rate(s.batch, args.steps):8.0f} batches/s")
        s8 = TrainSampler(data, train.meta, 768, seed=0, epochs_per_iter=2000, process_index=3, process_count=8)
        print(f"global batch 768, 1 of 8    : {rate(s8.batch, args.steps):8.0f} batches/s (96 rows each)")
        t = time.perf_counter()
        TrainSampler(data, train.meta, 768, seed=0, epochs_per_iter=2000).batch(60_000)
        print(f"cold batch at step 60,000   : {1e3 * (time.perf_counter() - t):8.1f} ms (resume cost)")
        t = time.perf_counter()
        n = sum(1 for _ in eval_batches(test.only_set(), test.meta, 768))
        print(f"test walk                   : {n / (time.perf_counter() - t):8.0f} batches/s over {n} batches")
    if not args.skip_train_step:
        r = train_step_rate(32)
        print(f"paper-config train step, CPU, batch 32: {r:.3f} steps/s = {32 * r:.1f} examples/s")


if __name__ == "__main__":
    main()
