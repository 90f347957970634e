"""Write a whole dataset or nothing: build in a hidden sibling directory, then rename.

An interrupted build (Ctrl-C, preemption, a bad CSV row found late) leaves at most a
`.<name>.partial-*` directory, never a half-written `<name>`. An existing dataset is never
replaced unless asked (`force`), and even then only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Iterator, List

import numpy as np

from kellen.data.format import DataError, Metadata, write_identifiers, write_split


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


def write_dataset(out: str, splits: Dict[str, tuple], identifiers: List[str], build_info: dict,
                  force: bool = False) -> str:
    """Write `{split: (Metadata, {set: arrays})}` to `out` (local or gs://), atomically."""
    from kellen import gcs

    def fill(root: str) -> None:
        for split, (meta, arrays_by_set) in splits.items():
            assert isinstance(meta, Metadata)
            write_split(os.path.join(root, split), meta, arrays_by_set)
        write_identifiers(root, identifiers)
        with open(os.path.join(root, "build.json"), "w") as f:
            json.dump({**build_info, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=1, default=_plain)

    if gcs.is_gcs(out):
        check_output(out, force)
        with tempfile.TemporaryDirectory() as tmp:
            fill(tmp)
            gcs.upload_tree(tmp, out)  # uploads the dataset.json files last
        return out
    with atomic_dir(out, force) as tmp:
        fill(tmp)
    return out


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def subsample(q: np.ndarray, a: np.ndarray, size, rng: np.random.Generator):
    """A seeded random subset of `size` puzzles (all of them if size is None or not smaller)."""
    if size is None or size >= q.shape[0]:
        return q, a
    if size < 1:
        raise DataError(f"--subsample-size must be >= 1, got {size}")
    idx = rng.choice(q.shape[0], size=size, replace=False)
    return q[idx], a[idx]
