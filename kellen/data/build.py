"""Write a whole dataset or nothing: build in a hidden sibling directory, then rename.

An interrupted build (Ctrl-C, preemption, a bad CSV row found late) leaves at most a
`.<name>.partial-*` directory, never a half-written `<name>`. An existing dataset is never
replaced unless asked (`force`), and even then only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np

from kellen.data.format import DataError


def check_output(out: str, force: bool) -> None:
    """Fail before any work if `out` would be overwritten without --force."""
    from kellen import gcs

    if gcs.is_gcs(out):
        if gcs.exists(out.rstrip("/") + "/") and not force:
            raise DataError(f"{out}: already exists (pass --force to replace it)")
        return
    if os.path.exists(out) and not force:
        raise DataError(f"{out}: already exists (pass --force to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes `out` only if the body finishes."""
    check_output(out, force)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            old = tmp + ".replaced"
            os.rename(out, old)  # the new copy is complete; swap, then drop the old one
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_dir(out: str, force: bool = False) -> Iterator[str]:
    """A local directory to fill; it becomes `out` only if the body finishes. For gs:// the
    tree is built locally, then uploaded with the dataset.json files last, so a reader never
    sees a partial dataset."""
    from kellen import gcs

    if not gcs.is_gcs(out):
        with atomic_dir(out, force) as tmp:
            yield tmp
        return
    check_output(out, force)
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        gcs.upload_tree(tmp, out)


def subsample(q: np.ndarray, a: np.ndarray, size, rng: np.random.Generator):
    """A seeded random subset of `size` puzzles (all of them if size is None or not smaller)."""
    if size is None or size >= q.shape[0]:
        return q, a
    if size < 1:
        raise DataError(f"--subsample-size must be >= 1, got {size}")
    idx = rng.choice(q.shape[0], size=size, replace=False)
    return q[idx], a[idx]


def decode_column(strings, table: np.ndarray, path: str, lines, name: str, expected: str) -> np.ndarray:
    """One CSV column as a [rows, len] uint8 array through a 256-entry lookup table (255 =
    not allowed); the first bad character is named with its file and row."""
    try:
        raw = np.frombuffer("".join(strings).encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        bad = next(i for i, s in enumerate(strings) if not s.isascii())
        raise DataError(f"{path}: row {lines[bad]}: column {name} has a non-ASCII character") from None
    out = table[raw].reshape(len(strings), -1)
    bad = np.flatnonzero((out == 255).any(1))
    if bad.size:
        i = bad[0]
        ch = strings[i][int(np.argmax(out[i] == 255))]
        raise DataError(f"{path}: row {lines[i]}: column {name} has {ch!r}; {expected}")
    return out


def fail_rows(mask: np.ndarray, path: str, lines, why: str) -> None:
    """DataError naming the first row where `mask` is set."""
    bad = np.flatnonzero(mask)
    if bad.size:
        raise DataError(f"{path}: row {lines[bad[0]]}: {why}")

