"""Maze datasets from maze-30x30-hard-1k style CSVs (`source,q,a,rating`), built with numpy.

Same dataset as the reference `build_maze_dataset.py`: charset `# SGo` mapped to tokens
1..5 (vocab 6), seq_len = side*side, and with `aug` each training maze is followed by its
7 other dihedral images (rotations and reflections). The subsample is seeded.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Tuple

import numpy as np

from kellen.data.build import decode_column, fail_rows
from kellen.data.format import DataError, single_example_arrays, single_set_metadata

CHARSET = "# SGo"
_TOKEN = np.full(256, 255, np.uint8)
_TOKEN[np.frombuffer(CHARSET.encode(), np.uint8)] = np.arange(1, len(CHARSET) + 1, dtype=np.uint8)
WALL, OPEN, START, GOAL, PATH = range(1, 6)


def read_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Mazes and solved mazes as token grids [N, side, side], checked row by row."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing file")
    qs, as_, lines, length = [], [], [], None
    with open(path, newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) is None:
            raise DataError(f"{path}: empty file (expected header source,q,a,rating)")
        for row in reader:
            line = reader.line_num
            if len(row) != 4:
                raise DataError(f"{path}: row {line}: expected 4 columns source,q,a,rating, got {len(row)}")
            _, q, a, _ = row
            if length is None:
                length = len(q)
                if math.isqrt(length) ** 2 != length or length == 0:
                    raise DataError(f"{path}: row {line}: column q has {length} characters, not a square grid")
            for name, s in (("q", q), ("a", a)):
                if len(s) != length:
                    raise DataError(f"{path}: row {line}: column {name} has {len(s)} characters, expected {length}")
            qs.append(q)
            as_.append(a)
            lines.append(line)
    if not qs:
        raise DataError(f"{path}: no mazes")
    side = math.isqrt(length)
    outside = f"outside the charset {CHARSET!r}"
    q, a = (decode_column(s, _TOKEN, path, lines, name, outside) for s, name in ((qs, "q"), (as_, "a")))
    check_solutions(q, a, path, np.asarray(lines))
    return q.reshape(-1, side, side), a.reshape(-1, side, side)


def check_solutions(q: np.ndarray, a: np.ndarray, path: str, lines: np.ndarray) -> None:
    """The answer copies the maze and only marks open cells as path; one start and one goal."""
    def fail(mask, why):
        fail_rows(mask, path, lines, why)

    fail((q == PATH).any(1), "the question already marks path cells 'o'")
    fail(((q == START).sum(1) != 1) | ((q == GOAL).sum(1) != 1), "the maze needs exactly one 'S' and one 'G'")
    fail(((q != a) & ~((q == OPEN) & (a == PATH))).any(1), "the answer changes a cell other than marking open cells 'o'")


def dihedral(grids: np.ndarray) -> np.ndarray:
    """[N, s, s] -> [N, 8, s, s]: the reference's 8 transforms in its order (tid 0..7)."""
    r1 = np.rot90(grids, 1, axes=(1, 2))
    return np.stack([grids, r1, np.rot90(grids, 2, axes=(1, 2)), np.rot90(grids, 3, axes=(1, 2)),
                     grids[:, :, ::-1], grids[:, ::-1, :], grids.transpose(0, 2, 1), r1[:, :, ::-1]], axis=1)


def build_split(q: np.ndarray, a: np.ndarray, aug: bool):
    """(Metadata, {"all": arrays}) for one split; with aug each group holds the 8 dihedral images."""
    n, side = q.shape[0], q.shape[1]
    if aug:
        q, a = dihedral(q), dihedral(a)
    group = 8 if aug else 1
    arrays = single_example_arrays(np.ascontiguousarray(q.reshape(n * group, side * side)),
                                   np.ascontiguousarray(a.reshape(n * group, side * side)), group)
    return single_set_metadata(arrays, vocab_size=len(CHARSET) + 1), {"all": arrays}

