"""`kellen data ...` as a researcher runs it: real subprocesses, atomic builds, gs:// roots."""
import os
import pathlib
import subprocess

import numpy as np
import pytest

from kellen.data import build, cli as data_cli, format as fmt

SRC = pathlib.Path(__file__).parent / "fixtures" / "reference_data" / "source"


def run(kellen_cmd, *args, env=None):
    return subprocess.run(kellen_cmd + ["data", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)


def arrays(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in pathlib.Path(root).rglob("*.npy")}


def test_generated_sudoku_build_is_deterministic_and_described(kellen_cmd, tmp_path):
    out = tmp_path / "sud"
    r = run(kellen_cmd, "sudoku", "--out", out, "--generate", 40, "--test-generate", 10, "--num-aug", 2,
            "--seed", 3, "--subsample-size", 30)
    assert r.returncode == 0, r.stderr
    assert "[train]" in r.stdout and "set all: 30 groups, 90 puzzles, 90 examples" in r.stdout
    assert "set all: 10 groups, 10 puzzles, 10 examples" in r.stdout
    assert (out / "source" / "train.csv").exists() and (out / "build.json").exists()
    first = arrays(out)
    r = run(kellen_cmd, "sudoku", "--out", out, "--generate", 40, "--test-generate", 10, "--num-aug", 2,
            "--seed", 3, "--subsample-size", 30, "--force")
    assert r.returncode == 0, r.stderr
    assert arrays(out) == first
    info = run(kellen_cmd, "info", out)
    assert info.returncode == 0 and "seed=3" in info.stdout and '"seq_len": 81' in info.stdout


def test_generated_maze_build(kellen_cmd, tmp_path):
    r = run(kellen_cmd, "maze", "--out", tmp_path / "mz", "--generate", 6, "--test-generate", 2, "--aug",
            "--size", 12, "--min-path-len", 8)
    assert r.returncode == 0, r.stderr
    train = fmt.load_split(str(tmp_path / "mz"), "train")
    assert train.meta.seq_len == 144 and train.meta.vocab_size == 6 and train.only_set().num_examples == 48


def test_existing_dataset_is_never_overwritten_without_force(kellen_cmd, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("results")
    r = run(kellen_cmd, "sudoku", "--out", out, "--generate", 5)
    assert r.returncode == 2
    assert r.stderr.strip() == f"kellen data sudoku: error: {out}: already exists (pass --force to replace it)"
    assert (out / "precious.txt").read_text() == "results"


@pytest.mark.parametrize("args,message", [
    (["--csv", "MISSING"], "MISSING: missing file"),
    ([], "give --csv FILE|DIR or --generate N"),
    (["--csv", SRC / "sudoku" / "train.csv"], "no test set; give --test-csv FILE or --test-generate N"),
    (["--generate", 5, "--num-aug", -1], "--num-aug must be >= 0"),
])
def test_bad_input_gets_one_line(kellen_cmd, tmp_path, args, message):
    r = run(kellen_cmd, "sudoku", "--out", tmp_path / "x", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_malformed_csv_row_fails_before_anything_is_written(kellen_cmd, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (SRC / "sudoku" / "train.csv").read_text().splitlines()
    src, q, a, rating = lines[3].split(",")
    lines[3] = ",".join([src, q, a[:40] + ("1" if a[40] != "1" else "2") + a[41:], rating])
    (bad / "train.csv").write_text("\n".join(lines) + "\n")
    (bad / "test.csv").write_text((SRC / "sudoku" / "test.csv").read_text())
    r = run(kellen_cmd, "sudoku", "--csv", bad, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert f"{bad / 'train.csv'}: row 4: answer" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing half-written


def test_interrupted_build_leaves_no_dataset_and_keeps_the_old_one(tmp_path, monkeypatch):
    calls = []
    real = fmt.write_split

    def dies_on_test_split(split_dir, meta, arrays_by_set):
        calls.append(split_dir)
        if split_dir.endswith("test"):
            raise KeyboardInterrupt  # as if Ctrl-C / preemption hit mid-write
        real(split_dir, meta, arrays_by_set)

    monkeypatch.setattr(fmt, "write_split", dies_on_test_split)
    out = tmp_path / "ds"
    argv = ["data", "sudoku", "--csv", str(SRC / "sudoku"), "--out", str(out)]
    from kellen.cli import main
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert len(calls) == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(fmt, "write_split", real)
    assert main(argv) == 0
    before = arrays(out)
    monkeypatch.setattr(fmt, "write_split", dies_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--force", "--num-aug", "1"])
    assert arrays(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_atomic_dir_replaces_only_complete_builds(tmp_path):
    out = tmp_path / "d"
    with build.atomic_dir(str(out)) as tmp:
        pathlib.Path(tmp, "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(fmt.DataError, match="already exists"):
        with build.atomic_dir(str(out)):
            pass
    with build.atomic_dir(str(out), force=True) as tmp:
        pathlib.Path(tmp, "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and len(list(tmp_path.iterdir())) == 1


def test_gcs_root_builds_uploads_and_loads_from_the_cache(kellen_cmd, tmp_path, gcs_prefix):
    url = gcs_prefix + "sudoku"
    env = {**os.environ, "KELLEN_CACHE": str(tmp_path / "cache")}
    r = run(kellen_cmd, "sudoku", "--csv", SRC / "sudoku", "--out", url, "--num-aug", 1, env=env)
    assert r.returncode == 0, r.stderr
    assert f"dataset {url}" in r.stdout and "set all: 12 groups, 24 puzzles" in r.stdout
    r = run(kellen_cmd, "sudoku", "--csv", SRC / "sudoku", "--out", url, env=env)
    assert r.returncode == 2 and "already exists" in r.stderr
    os.environ["KELLEN_CACHE"] = str(tmp_path / "cache2")
    try:
        split = fmt.load_split(url, "train")
        assert str(tmp_path / "cache2") in split.path
        assert isinstance(split.only_set().inputs, np.memmap)
        local = fmt.load_split(str(tmp_path / "cache2" / url[len("gs://"):].rstrip("/")), "train")
        assert np.array_equal(local.only_set().labels, split.only_set().labels)
        assert "24 examples" in data_cli.describe(url)
    finally:
        del os.environ["KELLEN_CACHE"]
