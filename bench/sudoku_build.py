"""Benchmark: the 1,000-puzzle x 1,000-augmentation Sudoku build, vectorised vs a per-augmentation loop.

The baseline re-implements the reference builder's algorithm (build_sudoku_dataset.py): one
shuffle per augmentation drawn with np.random, an 81-entry mapping built in a Python list
comprehension, and one array appended per example, concatenated at the end. Both produce the
same arrays (train split, int64 tokens digit+1, the reference's index arrays).

    .venv/bin/python bench/sudoku_build.py [--puzzles 1000] [--num-aug 1000] [--skip-baseline]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kellen.data import sudoku  # noqa: E402
from kellen.data.sudoku_gen import generate_sudoku, write_sudoku_csv  # noqa: E402


def loop_shuffle(board, solution):
    digit_map = np.pad(np.random.permutation(np.arange(1, 10)), (1, 0))
    transpose = np.random.rand() < 0.5
    bands = np.random.permutation(3)
    row_perm = np.concatenate([b * 3 + np.random.permutation(3) for b in bands])
    stacks = np.random.permutation(3)
    col_perm = np.concatenate([s * 3 + np.random.permutation(3) for s in stacks])
    mapping = np.array([row_perm[i // 9] * 9 + col_perm[i % 9] for i in range(81)])

    def apply(x):
        if transpose:
            x = x.T
        return digit_map[x.flatten()[mapping].reshape(9, 9).copy()]

    return apply(board), apply(solution)


def loop_build(q, a, num_aug):
    inputs, labels, puzzle_indices, group_indices = [], [], [0], [0]
    count = 0
    for orig_q, orig_a in zip(q.reshape(-1, 9, 9), a.reshape(-1, 9, 9)):
        for k in range(1 + num_aug):
            x, y = (orig_q, orig_a) if k == 0 else loop_shuffle(orig_q, orig_a)
            inputs.append(x)
            labels.append(y)
            count += 1
            puzzle_indices.append(count)
        group_indices.append(count)
    to_np = lambda seq: np.concatenate(seq).reshape(len(seq), -1) + 1  # noqa: E731
    return {"inputs": to_np(inputs), "labels": to_np(labels),
            "puzzle_indices": np.array(puzzle_indices, np.int32), "group_indices": np.array(group_indices, np.int32)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--num-aug", type=int, default=1000)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = os.path.join(tmp, "train.csv")
        t = time.perf_counter()
        write_sudoku_csv(csv_path, generate_sudoku(args.puzzles, seed=0))
        print(f"generate {args.puzzles} puzzles: {time.perf_counter() - t:.1f} s")
        q, a = sudoku.read_csv(csv_path)

    t = time.perf_counter()
    _, sets = sudoku.build_split(q, a, args.num_aug, np.random.default_rng(0))
    fast = time.perf_counter() - t
    ours = sets["all"]
    print(f"vectorised build: {fast:.2f} s for {ours['inputs'].shape[0]:,} examples")
    if args.skip_baseline:
        return
    np.random.seed(0)
    t = time.perf_counter()
    ref = loop_build(q, a, args.num_aug)
    slow = time.perf_counter() - t
    print(f"per-augmentation loop: {slow:.2f} s")
    for k in ("inputs", "labels", "puzzle_indices", "group_indices"):
        assert ref[k].shape == ours[k].shape and ref[k].dtype == ours[k].dtype, k
    assert (ref["inputs"][:: args.num_aug + 1] == ours["inputs"][:: args.num_aug + 1]).all()
    print(f"speed-up: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
