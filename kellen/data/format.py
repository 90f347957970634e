"""The reference puzzle-dataset layout, read and written unchanged.

    <root>/identifiers.json
    <root>/{train,test}/dataset.json
    <root>/{train,test}/<set>__{inputs,labels,puzzle_identifiers,puzzle_indices,group_indices}.npy

A *group* is one original puzzle and its augmentations; a *puzzle* owns a run of examples
(rows of inputs/labels). `puzzle_indices` and `group_indices` are CSR offsets (int32).
The reference builders write `total_puzzles` equal to the group count and
`mean_puzzle_examples=1`; the reference trainer sizes runs from those two, so we keep them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

SPLITS = ("train", "test")
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
IGNORE_LABEL = -100  # what the loss skips; the reference's IGNORE_LABEL_ID


class DataError(ValueError):
    """A dataset or source file that cannot be used; the message names the file and key or row."""


@dataclass(frozen=True)
class Metadata:
    pad_id: int
    ignore_label_id: Optional[int]
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: List[str] = field(default_factory=lambda: ["all"])

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "Metadata":
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object")
        values = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in raw:
                raise DataError(f"{where}: missing key '{name}'")
            v = raw[name]
            if name == "sets":
                ok = isinstance(v, list) and v and all(isinstance(s, str) and s for s in v)
                expect = "a non-empty list of names"
            elif name == "mean_puzzle_examples":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                expect = "a positive number"
            elif name == "ignore_label_id":
                ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
                expect = "an integer or null"
            else:
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
                expect = "a non-negative integer"
            if not ok:
                raise DataError(f"{where}: key '{name}' must be {expect}, got {v!r}")
            values[name] = v
        meta = cls(**values)
        for name in ("vocab_size", "seq_len", "num_puzzle_identifiers"):
            if getattr(meta, name) < 1:
                raise DataError(f"{where}: key '{name}' must be >= 1, got {getattr(meta, name)}")
        return meta

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PuzzleSet:
    """One set's arrays: inputs/labels memory-mapped, the index arrays in memory."""
    name: str
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.size - 1)


@dataclass
class Split:
    path: str  # <root>/<split>
    meta: Metadata
    sets: Dict[str, PuzzleSet]

    def only_set(self) -> PuzzleSet:
        if len(self.sets) != 1:
            raise DataError(f"{self.path}/dataset.json: key 'sets' lists {list(self.sets)}; "
                            "kellen trains on single-set datasets (as every reference builder writes)")
        return next(iter(self.sets.values()))


def array_path(split_dir: str, set_name: str, name: str) -> str:
    return os.path.join(split_dir, f"{set_name}__{name}.npy")


def read_metadata(split_dir: str) -> Metadata:
    path = os.path.join(split_dir, "dataset.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing file (not a puzzle dataset split)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return Metadata.from_dict(raw, path)


def local_root(root: str) -> str:
    """A local directory for `root`; gs:// roots are downloaded once into the cache."""
    from kellen import gcs

    if gcs.is_gcs(root):
        return gcs.cached_copy(root)
    return root


def load_split(root: str, split: str, check: bool = True) -> Split:
    """Open `<root>/<split>`: metadata, inputs/labels memory-mapped, indices loaded."""
    split_dir = os.path.join(local_root(root), split)
    meta = read_metadata(split_dir)
    sets = {}
    for set_name in meta.sets:
        arrays = {}
        for name in FIELDS:
            path = array_path(split_dir, set_name, name)
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing file (listed by {split_dir}/dataset.json key 'sets')")
            try:
                arrays[name] = np.load(path, mmap_mode="r" if name in ("inputs", "labels") else None)
            except ValueError as e:
                raise DataError(f"{path}: not a readable .npy array ({e})") from None
        sets[set_name] = PuzzleSet(set_name, **arrays)
    out = Split(split_dir, meta, sets)
    if check:
        check_split(out)
    return out


def check_split(split: Split) -> None:
    """Raise DataError if dataset.json disagrees with the arrays, naming file and key."""
    meta, where = split.meta, os.path.join(split.path, "dataset.json")
    groups = 0
    for s in split.sets.values():
        f = lambda name: array_path(split.path, s.name, name)  # noqa: E731
        for name in FIELDS:
            arr = getattr(s, name)
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{f(name)}: dtype {arr.dtype} is not an integer type")
        if s.inputs.ndim != 2 or s.inputs.shape[1] != meta.seq_len:
            raise DataError(f"{f('inputs')}: shape {s.inputs.shape} disagrees with {where} key 'seq_len'={meta.seq_len}")
        if s.labels.shape != s.inputs.shape:
            raise DataError(f"{f('labels')}: shape {s.labels.shape} differs from inputs {s.inputs.shape}")
        pi, gi = s.puzzle_indices, s.group_indices
        if pi.ndim != 1 or pi.size < 1 or pi[0] != 0 or pi[-1] != s.num_examples or np.any(np.diff(pi) < 0):
            raise DataError(f"{f('puzzle_indices')}: must rise from 0 to the {s.num_examples} rows of inputs")
        puzzles = pi.size - 1
        if gi.ndim != 1 or gi.size < 1 or gi[0] != 0 or gi[-1] != puzzles or np.any(np.diff(gi) <= 0):
            raise DataError(f"{f('group_indices')}: must rise strictly from 0 to the {puzzles} puzzles")
        if s.puzzle_identifiers.shape != (puzzles,):
            raise DataError(f"{f('puzzle_identifiers')}: shape {s.puzzle_identifiers.shape}, expected ({puzzles},)")
        if puzzles and (s.puzzle_identifiers.min() < 0 or s.puzzle_identifiers.max() >= meta.num_puzzle_identifiers):
            raise DataError(f"{f('puzzle_identifiers')}: ids outside [0, {meta.num_puzzle_identifiers}) "
                            f"set by {where} key 'num_puzzle_identifiers'")
        if s.num_examples:
            for name in ("inputs", "labels"):
                arr = getattr(s, name)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= meta.vocab_size:
                    raise DataError(f"{f(name)}: token {hi if hi >= meta.vocab_size else lo} outside "
                                    f"[0, {meta.vocab_size}) set by {where} key 'vocab_size'")
        groups += s.num_groups
    if groups != meta.total_groups:
        raise DataError(f"{where}: key 'total_groups'={meta.total_groups} but the group_indices hold {groups} groups")


def write_split(split_dir: str, meta: Metadata, arrays_by_set: Dict[str, Dict[str, np.ndarray]]) -> None:
    """Write one split in the reference layout; dataset.json last."""
    os.makedirs(split_dir, exist_ok=True)
    for set_name, arrays in arrays_by_set.items():
        for name in FIELDS:
            np.save(array_path(split_dir, set_name, name), arrays[name])
    with open(os.path.join(split_dir, "dataset.json"), "w") as f:
        json.dump(meta.to_dict(), f)


def write_identifiers(root: str, identifiers: List[str]) -> None:
    with open(os.path.join(root, "identifiers.json"), "w") as f:
        json.dump(identifiers, f)


def single_example_arrays(inputs: np.ndarray, labels: np.ndarray, group_size: int) -> Dict[str, np.ndarray]:
    """Index arrays for the common case: every puzzle is one example, groups of `group_size` puzzles."""
    n = inputs.shape[0]
    if n % group_size:
        raise ValueError(f"{n} examples do not split into groups of {group_size}")
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(n, np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),
        "group_indices": np.arange(0, n + 1, group_size, dtype=np.int32),
    }


def single_set_metadata(arrays: Dict[str, np.ndarray], vocab_size: int) -> Metadata:
    """Metadata exactly as the reference sudoku/maze builders write it."""
    groups = int(arrays["group_indices"].size - 1)
    return Metadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab_size,
                    seq_len=int(arrays["inputs"].shape[1]), num_puzzle_identifiers=1, total_groups=groups,
                    mean_puzzle_examples=1.0, total_puzzles=groups, sets=["all"])


def check_fits(meta: Metadata, arch, where: str) -> None:
    """Raise DataError if the model config cannot take this dataset (before anything compiles)."""
    if arch.seq_len != meta.seq_len:
        raise DataError(f"{where}: key 'seq_len'={meta.seq_len} does not fit arch.seq_len={arch.seq_len}")
    if arch.vocab_size < meta.vocab_size:
        raise DataError(f"{where}: key 'vocab_size'={meta.vocab_size} does not fit arch.vocab_size={arch.vocab_size}")
    if arch.num_puzzle_identifiers < meta.num_puzzle_identifiers:
        raise DataError(f"{where}: key 'num_puzzle_identifiers'={meta.num_puzzle_identifiers} does not fit "
                        f"arch.num_puzzle_identifiers={arch.num_puzzle_identifiers}")
