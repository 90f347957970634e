"""Batches in the reference's order, as pure functions of (seed, step).

Training (reference `PuzzleDataset._iter_train`): an *iteration* concatenates
`epochs_per_iter` random permutations of the groups; each group in turn contributes one
random puzzle and up to that puzzle's examples; batches are cut at `global_batch_size` and
the last partial batch is dropped. Here iteration `i` draws everything from
`default_rng([seed, i])`, so the batch at any step can be rebuilt after a restart without
replaying the run, and every process computes the same global plan (indices only, cheap)
and reads only its own rows.

Test (reference `_iter_test`): the test set in global-batch chunks; short chunks are padded
with pad_id inputs, label -100 and the blank identifier, so padding never counts.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

from kellen.data.format import IGNORE_LABEL, DataError, Metadata, PuzzleSet


class TrainSampler:
    def __init__(self, data: PuzzleSet, meta: Metadata, global_batch_size: int, seed: int,
                 epochs_per_iter: int = 1, process_index: int = 0, process_count: int = 1):
        if global_batch_size < 1 or global_batch_size % process_count:
            raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                            f"{process_count} processes")
        if epochs_per_iter < 1:
            raise DataError(f"epochs_per_iter={epochs_per_iter} must be >= 1")
        if seed < 0:
            raise DataError(f"seed={seed} must be >= 0")
        self.data, self.meta, self.seed = data, meta, seed
        self.global_batch_size, self.epochs_per_iter = global_batch_size, epochs_per_iter
        self.local_batch_size = global_batch_size // process_count
        self.row_start = process_index * self.local_batch_size
        sizes = np.diff(data.puzzle_indices)
        self._single = bool(np.all(sizes == 1))  # one example per puzzle: a closed-form step count
        self._counts: list = []  # batches in each iteration so far (variable-size puzzles only)
        self._cache: Tuple[int, tuple] = (-1, ())
        if self.batches_in(0) == 0:
            raise DataError(f"global_batch_size={global_batch_size} exceeds what one iteration draws "
                            f"({epochs_per_iter} x {data.num_groups} groups): no full batch")

    def plan(self, iteration: int) -> Tuple[np.ndarray, np.ndarray]:
        """Example and puzzle indices [batches, global_batch_size] of one iteration."""
        if self._cache[0] == iteration:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, iteration])
        gi, pi, b = self.data.group_indices, self.data.puzzle_indices, self.global_batch_size
        order = np.concatenate([rng.permutation(self.data.num_groups) for _ in range(self.epochs_per_iter)])
        puzzles = rng.integers(gi[order], gi[order + 1])
        if self._single:
            n = puzzles.size // b * b
            out = (pi[puzzles[:n]].reshape(-1, b), puzzles[:n].reshape(-1, b))
        else:
            out = self._pack(rng, puzzles)
        self._cache = (iteration, out)
        return out

    def _pack(self, rng, puzzles) -> Tuple[np.ndarray, np.ndarray]:
        """The reference packing for puzzles with several examples: a puzzle that overflows the
        batch is cut (a random subset of its examples), and the next batch starts fresh."""
        pi, b = self.data.puzzle_indices, self.global_batch_size
        ex_rows, pz_rows, ex, pz = [], [], [], []
        fill = 0
        for p in puzzles:
            size = int(pi[p + 1] - pi[p])
            take = min(size, b - fill)
            ex.append(pi[p] + rng.choice(size, take, replace=False))
            pz.append(np.full(take, p))
            fill += take
            if fill == b:
                ex_rows.append(np.concatenate(ex))
                pz_rows.append(np.concatenate(pz))
                ex, pz, fill = [], [], 0
        if not ex_rows:
            return np.zeros((0, b), np.int64), np.zeros((0, b), np.int64)
        return np.stack(ex_rows), np.stack(pz_rows)

    def batches_in(self, iteration: int) -> int:
        if self._single:
            return self.epochs_per_iter * self.data.num_groups // self.global_batch_size
        while len(self._counts) <= iteration:
            self._counts.append(len(self.plan(len(self._counts))[0]))
        return self._counts[iteration]

    def locate(self, step: int) -> Tuple[int, int]:
        """(iteration, batch within it) of a global step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._single:
            return divmod(step, self.batches_in(0))
        it = 0
        while step >= self.batches_in(it):
            step -= self.batches_in(it)
            it += 1
        return it, step

    def global_indices(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        it, k = self.locate(step)
        ex, pz = self.plan(it)
        return ex[k], pz[k]

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`."""
        ex, pz = self.global_indices(step)
        rows = slice(self.row_start, self.row_start + self.local_batch_size)
        return collate(self.data, self.meta, ex[rows], pz[rows], self.local_batch_size)

    def iter_from(self, step: int) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """(step, batch) from `step` on, forever: resume is just a different start."""
        while True:
            yield step, self.batch(step)
            step += 1


def collate(data: PuzzleSet, meta: Metadata, examples: np.ndarray, puzzles: np.ndarray,
            rows: int) -> Dict[str, np.ndarray]:
    """int32 arrays of `rows` rows; the ignore label becomes -100; missing rows are padding."""
    order = np.argsort(examples, kind="stable")  # sorted reads are kinder to a memory map
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    inputs = np.asarray(data.inputs[examples[order]], np.int32)[inv]
    labels = np.asarray(data.labels[examples[order]], np.int32)[inv]
    if meta.ignore_label_id is not None:
        labels[labels == meta.ignore_label_id] = IGNORE_LABEL
    ids = np.asarray(data.puzzle_identifiers[puzzles], np.int32)
    pad = rows - examples.size
    if pad:
        inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=meta.pad_id)
        labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL)
        ids = np.pad(ids, (0, pad), constant_values=meta.blank_identifier_id)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def num_eval_batches(data: PuzzleSet, global_batch_size: int) -> int:
    return -(-data.num_examples // global_batch_size)


def eval_batches(data: PuzzleSet, meta: Metadata, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
    """(local batch, real rows in the global batch) over the whole test set, in order."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                        f"{process_count} processes")
    local = global_batch_size // process_count
    total = data.num_examples
    for start in range(0, total, global_batch_size):
        end = min(total, start + global_batch_size)
        lo = min(end, start + process_index * local)
        hi = min(end, lo + local)
        examples = np.arange(lo, hi)
        puzzles = np.searchsorted(data.puzzle_indices, examples, side="right") - 1
        yield collate(data, meta, examples, puzzles, local), end - start
