"""An independent reader of the reference puzzle-dataset layout, written from its documented
format (not from kellen.data), standing in for the reference's torch `PuzzleDataset`.

It loads what the reference loads (metadata keys and types, the five arrays per set), walks the
test split the way the reference's test iterator does (global chunks, per-rank slices, puzzle
lookup by a forward walk, padding) and draws training batches the reference's way (group
permutation, random puzzle per group, packing, dropping the short batch).
"""
import json
import os

import numpy as np

META_TYPES = {"pad_id": int, "ignore_label_id": (int, type(None)), "blank_identifier_id": int,
              "vocab_size": int, "seq_len": int, "num_puzzle_identifiers": int, "total_groups": int,
              "mean_puzzle_examples": (int, float), "total_puzzles": int, "sets": list}
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


def load(root, split):
    with open(os.path.join(root, split, "dataset.json")) as f:
        meta = json.load(f)
    assert set(meta) == set(META_TYPES), sorted(meta)
    for k, t in META_TYPES.items():
        assert isinstance(meta[k], t), (k, meta[k])
    data = {}
    for s in meta["sets"]:
        data[s] = {k: np.load(os.path.join(root, split, f"{s}__{k}.npy"),
                              mmap_mode="r" if k in ("inputs", "labels") else None) for k in FIELDS}
    return meta, data


def _collate(meta, batch, local):
    batch = {k: np.array(v).astype(np.int32) for k, v in batch.items()}
    if meta["ignore_label_id"] is not None:
        batch["labels"][batch["labels"] == meta["ignore_label_id"]] = -100
    n = batch["puzzle_identifiers"].size
    if n < local:
        pads = {"inputs": meta["pad_id"], "labels": -100, "puzzle_identifiers": meta["blank_identifier_id"]}
        batch = {k: np.pad(v, ((0, local - n),) + ((0, 0),) * (v.ndim - 1), constant_values=pads[k])
                 for k, v in batch.items()}
    return batch


def iter_test(root, global_batch, rank=0, replicas=1):
    meta, data = load(root, "test")
    local = global_batch // replicas
    for d in data.values():
        total, start = len(d["inputs"]), 0
        while start < total:
            end = min(total, start + global_batch)
            lo, hi = start + rank * local, min(start + (rank + 1) * local, end)
            pidx, p = [], np.searchsorted(d["puzzle_indices"], lo, side="right") - 1
            for i in range(lo, hi):
                while p + 1 < len(d["puzzle_indices"]) and i >= d["puzzle_indices"][p + 1]:
                    p += 1
                pidx.append(p)
            yield _collate(meta, {"inputs": d["inputs"][lo:hi], "labels": d["labels"][lo:hi],
                                  "puzzle_identifiers": d["puzzle_identifiers"][pidx]}, local), end - start
            start += global_batch


def iter_train_epoch(root, global_batch, seed):
    """One epoch of training batches; yields (example indices, puzzle indices, batch)."""
    meta, data = load(root, "train")
    rng = np.random.Generator(np.random.Philox(seed=seed))
    for d in data.values():
        order, start = rng.permutation(d["group_indices"].size - 1), 0
        while start < order.size:
            ex, pz, size = [], [], 0
            while start < order.size and size < global_batch:
                g = order[start]
                p = rng.integers(d["group_indices"][g], d["group_indices"][g + 1])
                start += 1
                first, count = d["puzzle_indices"][p], int(d["puzzle_indices"][p + 1] - d["puzzle_indices"][p])
                take = min(count, global_batch - size)
                ex.append(first + rng.choice(count, take, replace=False))
                pz.append(np.full(take, p))
                size += take
            if size < global_batch:
                break
            ex, pz = np.concatenate(ex), np.concatenate(pz)
            yield ex, pz, _collate(meta, {"inputs": d["inputs"][ex], "labels": d["labels"][ex],
                                          "puzzle_identifiers": d["puzzle_identifiers"][pz]}, global_batch)
