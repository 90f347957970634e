"""The reference dataset layout: reference-built datasets load unchanged, ours match them byte for
byte where the build is deterministic, and an independent reader of the format reads ours."""
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import reference_reader  # tests/reference_reader.py
from kellen.data import format as fmt
from kellen.data.sampler import eval_batches
from kellen.model.config import TRMConfig

REF = pathlib.Path(__file__).parent / "fixtures" / "reference_data"
SRC = REF / "source"


def kellen_data(kellen_cmd, *args):
    return subprocess.run(kellen_cmd + ["data", *map(str, args)], capture_output=True, text=True, timeout=300)


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in pathlib.Path(root).rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["sudoku_aug0", "sudoku_aug3", "maze_aug"])
def test_reference_built_dataset_loads_unchanged(name):
    for split in fmt.SPLITS:
        s = fmt.load_split(str(REF / name), split)
        raw = json.loads((REF / name / split / "dataset.json").read_text())
        assert s.meta.to_dict() == raw
        for field in fmt.FIELDS:
            on_disk = np.load(REF / name / split / f"all__{field}.npy")
            got = getattr(s.sets["all"], field)
            assert got.dtype == on_disk.dtype and np.array_equal(got, on_disk)


@pytest.mark.parametrize("kind,name,extra", [("sudoku", "sudoku_aug0", []), ("maze", "maze_aug", ["--aug"])])
def test_our_build_is_byte_identical_to_the_reference_build(kellen_cmd, tmp_path, kind, name, extra):
    out = tmp_path / name
    r = kellen_data(kellen_cmd, kind, "--csv", SRC / kind, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    ref_files = files_under(REF / name)
    assert set(ref_files) <= set(files_under(out))
    for f in ref_files:
        assert (out / f).read_bytes() == (REF / name / f).read_bytes(), f


def sudoku_valid(grids):
    g = grids.reshape(-1, 9, 9)
    boxes = g.reshape(-1, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    full = np.arange(1, 10)
    return all((np.sort(u, axis=-1) == full).all() for u in (g, g.transpose(0, 2, 1), boxes))


def test_augmented_sudoku_matches_reference_structure(kellen_cmd, tmp_path):
    out = tmp_path / "aug3"
    r = kellen_data(kellen_cmd, "sudoku", "--csv", SRC / "sudoku", "--out", out, "--num-aug", 3, "--seed", 5)
    assert r.returncode == 0, r.stderr
    ref = REF / "sudoku_aug3"
    for f in ["identifiers.json", "train/dataset.json", "test/dataset.json"] + \
             [f"test/all__{k}.npy" for k in fmt.FIELDS] + \
             [f"train/all__{k}.npy" for k in ("puzzle_identifiers", "puzzle_indices", "group_indices")]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    for field in ("inputs", "labels"):
        ours, theirs = np.load(out / "train" / f"all__{field}.npy"), np.load(ref / "train" / f"all__{field}.npy")
        assert ours.dtype == theirs.dtype == np.int64 and ours.shape == theirs.shape
        assert np.array_equal(ours[::4], theirs[::4])  # each group starts with the original puzzle
    q, a = (np.load(out / "train" / f"all__{k}.npy") - 1 for k in ("inputs", "labels"))
    assert sudoku_valid(a)
    assert ((q == 0) | (q == a)).all()
    clues = (q != 0).sum(1).reshape(-1, 4)
    assert (clues == clues[:, :1]).all()  # a shuffle moves clues, never adds or drops one
    assert not np.array_equal(q[1::4], q[::4])


def test_a_dataset_we_write_reads_in_the_reference_reader(kellen_cmd, tmp_path):
    out = tmp_path / "gen"
    r = kellen_data(kellen_cmd, "sudoku", "--generate", 30, "--test-generate", 13, "--num-aug", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    ours = fmt.load_split(str(out), "test")
    for ranks in (1, 2):
        for rank in range(ranks):
            theirs = list(reference_reader.iter_test(str(out), 8, rank, ranks))
            mine = list(eval_batches(ours.only_set(), ours.meta, 8, rank, ranks))
            assert len(theirs) == len(mine) == 2
            for (tb, tn), (mb, mn) in zip(theirs, mine):
                assert tn == mn
                for k in tb:
                    assert tb[k].dtype == mb[k].dtype and np.array_equal(tb[k], mb[k]), k
    batches = list(reference_reader.iter_train_epoch(str(out), 8, seed=1))
    assert len(batches) == 30 // 8
    train = fmt.load_split(str(out), "train").only_set()
    for ex, pz, b in batches:
        groups = np.searchsorted(train.group_indices, pz, side="right") - 1
        assert len(set(groups)) == 8 and b["inputs"].shape == (8, 81) and (b["inputs"] >= 1).all()


@pytest.fixture
def dataset_copy(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(REF / "sudoku_aug3", root)
    return root


def edit_meta(root, split="train", **changes):
    path = root / split / "dataset.json"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("change,expect", [
    ({"seq_len": 80}, ["all__inputs.npy", "'seq_len'=80"]),
    ({"total_groups": 11}, ["dataset.json", "'total_groups'=11", "12 groups"]),
    ({"vocab_size": 10}, ["all__inputs.npy", "token 10", "'vocab_size'"]),
    ({"vocab_size": None}, ["dataset.json", "missing key 'vocab_size'"]),
    ({"seq_len": "81"}, ["dataset.json", "'seq_len' must be"]),
    ({"sets": ["all", "extra"]}, ["extra__inputs.npy", "missing file"]),
])
def test_dataset_json_disagreeing_with_arrays_is_named(dataset_copy, change, expect):
    edit_meta(dataset_copy, **change)
    with pytest.raises(fmt.DataError) as e:
        fmt.load_split(str(dataset_copy), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(dataset_copy / "train") in msg
    for part in expect:
        assert part in msg


def test_broken_arrays_and_missing_files_are_named(dataset_copy):
    train = dataset_copy / "train"
    pi = np.load(train / "all__puzzle_indices.npy")
    np.save(train / "all__puzzle_indices.npy", pi[:-1])
    with pytest.raises(fmt.DataError, match="all__puzzle_indices.npy: must rise from 0"):
        fmt.load_split(str(dataset_copy), "train")
    (train / "all__labels.npy").unlink()
    with pytest.raises(fmt.DataError, match="all__labels.npy: missing file"):
        fmt.load_split(str(dataset_copy), "train")
    (dataset_copy / "test" / "dataset.json").write_text("{not json")
    with pytest.raises(fmt.DataError, match="test/dataset.json: not valid JSON"):
        fmt.load_split(str(dataset_copy), "test")
    with pytest.raises(fmt.DataError, match="nowhere/train/dataset.json: missing file"):
        fmt.load_split(str(dataset_copy / "nowhere"), "train")


def test_dataset_must_fit_the_model_config():
    meta = fmt.load_split(str(REF / "maze_aug"), "train").meta
    where = "data/maze/train/dataset.json"
    fmt.check_fits(meta, TRMConfig(seq_len=900, vocab_size=6), where)
    with pytest.raises(fmt.DataError, match=r"data/maze/train/dataset.json: key 'seq_len'=900 does not fit arch.seq_len=81"):
        fmt.check_fits(meta, TRMConfig(seq_len=81, vocab_size=6), where)
    with pytest.raises(fmt.DataError, match=r"'vocab_size'=6 does not fit arch.vocab_size=5"):
        fmt.check_fits(meta, TRMConfig(seq_len=900, vocab_size=5), where)
