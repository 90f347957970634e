"""Sudoku datasets from sudoku-extreme CSVs (`source,q,a,rating`), built with whole-array numpy.

Same dataset as the reference `build_sudoku_dataset.py`: tokens are digit+1 (vocab 11,
seq_len 81), each training group is the original puzzle followed by `num_aug` shuffled
copies, the test split is not augmented. Differences: the subsample is seeded, and every
augmentation of the build is drawn and applied at once instead of one Python call each.
"""
from __future__ import annotations

import csv
import os
from typing import Optional, Tuple

import numpy as np

from kellen.data.build import decode_column, fail_rows
from kellen.data.format import DataError, single_example_arrays, single_set_metadata

_ASCII = np.full(256, 255, np.uint8)
_ASCII[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_ASCII[ord(".")] = 0
_FULL_UNIT = 0b1111111110  # bits 1..9: a row/column/box holding each digit once
_CHUNK = 1 << 14  # augmentations per pass: keeps the int32 index arrays in cache


def read_csv(path: str, min_difficulty: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Puzzles and solutions as uint8 digit grids [N, 81] (0 = blank), checked row by row."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing file")
    qs, as_, lines = [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected header source,q,a,rating)")
        for row in reader:
            line = reader.line_num
            if len(row) != 4:
                raise DataError(f"{path}: row {line}: expected 4 columns source,q,a,rating, got {len(row)}")
            _, q, a, rating = row
            if min_difficulty is not None:
                try:
                    if int(rating) < min_difficulty:
                        continue
                except ValueError:
                    raise DataError(f"{path}: row {line}: rating {rating!r} is not an integer") from None
            for name, s in (("q", q), ("a", a)):
                if len(s) != 81:
                    raise DataError(f"{path}: row {line}: column {name} has {len(s)} characters, expected 81")
            qs.append(q)
            as_.append(a)
            lines.append(line)
    if not qs:
        raise DataError(f"{path}: no puzzles" + (f" with rating >= {min_difficulty}" if min_difficulty else ""))
    q = decode_column(qs, _ASCII, path, lines, "q", "expected digits with '.' or '0' for blanks")
    a = decode_column(as_, _ASCII, path, lines, "a", "expected digits with '.' or '0' for blanks")
    check_solutions(q, a, path, np.asarray(lines))
    return q, a


def check_solutions(q: np.ndarray, a: np.ndarray, path: str, lines: np.ndarray) -> None:
    """Every answer is a complete valid grid that agrees with its clues."""
    def fail(mask, why):
        fail_rows(mask, path, lines, why)

    fail((a == 0).any(1), "answer has blanks")
    fail(((q != 0) & (q != a)).any(1), "answer disagrees with a clue")
    bits = (np.left_shift(1, a.astype(np.int32))).reshape(-1, 9, 9)
    boxes = bits.reshape(-1, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    for unit, grid in (("row", bits), ("column", bits.transpose(0, 2, 1)), ("box", boxes)):
        fail((np.bitwise_or.reduce(grid, axis=2) != _FULL_UNIT).any(1), f"answer repeats a digit in a {unit}")


def draw_shuffles(m: int, rng: np.random.Generator) -> dict:
    """Parameters of `m` validity-preserving shuffles, as in the reference: a permutation of
    digits 1-9 (blank 0 stays), transpose with p=0.5, shuffle the bands and the rows within
    each band, shuffle the stacks and the columns within each stack."""
    digit_map = np.zeros((m, 10), np.uint8)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (m, 1)), axis=1)
    transpose = rng.random(m) < 0.5

    def line_perm():  # [m, 9]: band order, then the order within each band
        bands = rng.permuted(np.tile(np.arange(3), (m, 1)), axis=1)
        within = rng.permuted(np.tile(np.arange(3), (m, 3, 1)), axis=2)
        return (bands[:, :, None] * 3 + within).reshape(m, 9)

    return {"digit_map": digit_map, "transpose": transpose, "rows": line_perm(), "cols": line_perm()}


def apply_shuffles(grids, origin: np.ndarray, p: dict):
    """Shuffle `g[origin[k]]` by the k-th parameters, for each g in `grids`: new cell (i, j) is
    the digit-mapped old cell (rows[i], cols[j]) of the (maybe transposed) grid. Returns a list
    of [len(origin), 81] uint8 arrays. Works in cache-sized chunks with flat int32 gathers."""
    m = origin.size
    outs = [np.empty((m, 81), np.uint8) for _ in grids]
    flats = [np.ascontiguousarray(g, np.uint8).ravel() for g in grids]
    digit_map = p["digit_map"].ravel()
    # Transposed, cell (r, c) of the shuffled grid reads old cell (c, r): swap the strides.
    row_stride = np.where(p["transpose"], 1, 9).astype(np.int32)[:, None, None]
    for lo in range(0, m, _CHUNK):
        hi = min(m, lo + _CHUNK)
        rows, cols = p["rows"][lo:hi].astype(np.int32), p["cols"][lo:hi].astype(np.int32)
        stride = row_stride[lo:hi]
        src = (rows[:, :, None] * stride + cols[:, None, :] * (10 - stride)).reshape(hi - lo, 81)
        src += (origin[lo:hi, None] * 81).astype(np.int32)
        digit_base = (np.arange(lo, hi, dtype=np.int32) * 10)[:, None]
        for flat, out in zip(flats, outs):
            out[lo:hi] = digit_map.take(flat.take(src) + digit_base)
    return outs


def augment(q: np.ndarray, a: np.ndarray, num_aug: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """`num_aug` shuffles of each puzzle (the same shuffle for its solution), as [N, num_aug, 81]."""
    n = q.shape[0]
    origin = np.repeat(np.arange(n), num_aug)
    out_q, out_a = apply_shuffles([q, a], origin, draw_shuffles(origin.size, rng))
    return out_q.reshape(n, num_aug, 81), out_a.reshape(n, num_aug, 81)


def build_split(q: np.ndarray, a: np.ndarray, num_aug: int, rng: np.random.Generator):
    """(Metadata, {"all": arrays}) for one split; groups are [original, aug_1, ..., aug_k]."""
    n = q.shape[0]
    groups_q = np.empty((n, 1 + num_aug, 81), np.uint8)
    groups_a = np.empty_like(groups_q)
    groups_q[:, 0], groups_a[:, 0] = q, a
    if num_aug:
        groups_q[:, 1:], groups_a[:, 1:] = augment(q, a, num_aug, rng)
    # The reference writes uint8 tokens, but int64 once augmented (its digit map is int64); match it.
    dtype = np.int64 if num_aug else np.uint8
    arrays = single_example_arrays((groups_q + 1).reshape(-1, 81).astype(dtype),
                                   (groups_a + 1).reshape(-1, 81).astype(dtype), 1 + num_aug)
    return single_set_metadata(arrays, vocab_size=11), {"all": arrays}

