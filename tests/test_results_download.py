"""`kellen results download` (kellen/experiments/results_download.py) against the local GCS emulator
(conftest.py): layout, checkpoint filtering, --runs, resume by checksum, temp files, and the one-line
errors that must come before any download."""
import argparse
import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kellen import gcs
from tree_helpers import read_tree
from kellen.experiments import results_download as rd

GROUP = "expdl"
RUNS = ["expdl_a", "expdl_a--epochs=10000", "expdl_b"]
_rng = np.random.default_rng(0)
# <output_root>/expdl/...: three run dirs (one an override variant), with in-run checkpoints
RECORDS = {
    "expdl_a/status.json": b'{"state": "done"}',
    "expdl_a/summary.json": b'{"eval/all/exact_accuracy": 0.5}',
    "expdl_a/config.yaml": b"epochs: 10\n",
    "expdl_a/logs/metrics.jsonl": b'{"step": 1}\n{"step": 2}\n',
    "expdl_a/plots/loss.png": _rng.bytes(3000),
    "expdl_a/checkpoints/1/x": _rng.bytes(700),
    "expdl_a/checkpoints/1/_CHECKPOINT_METADATA": b"{}",
    "expdl_b/status.json": b'{"state": "running"}',
    "expdl_b/metrics.csv": b"step,loss\n1,2.0\n",
    "expdl_b/empty.txt": b"",
    "expdl_b/wandb/checkpoints/keep.txt": b"not a run checkpoint: kept",  # `checkpoints` deeper down
    "expdl_b/checkpoints/2/x": _rng.bytes(500),
    "expdl_a--epochs=10000/status.json": b'{"state": "queued"}',
    "expdl_a--epochs=10000/logs/train.log": b"hello\n",
}
# <storage_root>/checkpoints/expdl/...
STORED_CKPTS = {"expdl_a/1/x": _rng.bytes(900), "expdl_b/2/y": _rng.bytes(400)}


def no_run_ckpts(files):
    return {k: v for k, v in files.items() if k.split("/")[1] != "checkpoints"}


def upload(url, files):
    bucket, prefix = gcs.split_gcs(url)
    b = gcs.client().bucket(bucket)
    for rel, data in files.items():
        b.blob(f"{prefix}/{rel}").upload_from_string(data)


@pytest.fixture(scope="module")
def world(gcs_emulator, tmp_path_factory):
    """The group's records and stored checkpoints in the emulator, decoys beside them, and specs."""
    root = f"gs://{gcs_emulator.bucket}/{uuid.uuid4().hex}"
    upload(f"{root}/runs/{GROUP}", RECORDS)
    upload(f"{root}/checkpoints/{GROUP}", STORED_CKPTS)
    upload(f"{root}/runs/{GROUP}x", {"r/status.json": b"other group"})  # a sibling prefix, not ours
    upload(f"{root}/checkpoints/{GROUP}x", {"r/1/x": b"other group"})
    specs = tmp_path_factory.mktemp("specs")
    runs = "variables:\n  runs:\n    - values: {epochs: 10}\n    - values: {epochs: 20}\n"
    (specs / f"{GROUP}.yaml").write_text(f"id: {GROUP}\noutput_root: {root}/runs\nstorage_root: {root}\n{runs}")
    (specs / "exploc.yaml").write_text(f"id: exploc\n{runs}")  # records in the default, local `runs`
    return argparse.Namespace(root=root, specs=str(specs), env=gcs_emulator.env)


def dl(world, dest, **kw):
    return rd.download(GROUP, dest=str(dest), spec_dir=world.specs, progress=False, **kw)


def cli(world, *argv):
    p = argparse.ArgumentParser()
    rd.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["results", "download", *argv, "--spec-dir", world.specs, "--no-progress"])
    return args.fn(args)


def one_error_line(capsys):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("kellen results download: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ layout
def test_layout_bytes_and_checkpoints_left_out_by_default(world, tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "CHUNK_FILES", 3)  # several download_many chunks
    s = dl(world, tmp_path / "res")
    want = no_run_ckpts(RECORDS)
    assert read_tree(tmp_path / "res") == {f"{GROUP}/{k}": v for k, v in want.items()}
    assert "expdl_b/wandb/checkpoints/keep.txt" in want  # only <run>/checkpoints/ is dropped
    assert (s.downloaded, s.skipped, s.bytes) == (len(want), 0, sum(map(len, want.values())))
    assert s.runs == RUNS and s.dests == [str(tmp_path / "res" / GROUP)]


def test_with_checkpoints_fetches_both_places(world, tmp_path):
    s = dl(world, tmp_path / "res", with_checkpoints=True)
    want = {**{f"{GROUP}/{k}": v for k, v in RECORDS.items()},
            **{f"checkpoints/{GROUP}/{k}": v for k, v in STORED_CKPTS.items()}}
    assert read_tree(tmp_path / "res") == want  # and nothing of the sibling group expdlx
    assert s.downloaded == len(want) and s.dests[1] == str(tmp_path / "res" / "checkpoints" / GROUP)


def test_runs_patterns_filter_run_dirs_and_stored_checkpoints(world, tmp_path):
    s = dl(world, tmp_path / "res", with_checkpoints=True, runs_pattern="expdl_b, *--epochs=*")
    assert s.runs == ["expdl_a--epochs=10000", "expdl_b"]
    got = read_tree(tmp_path / "res")
    assert got == {**{f"{GROUP}/{k}": v for k, v in RECORDS.items() if not k.startswith("expdl_a/")},
                   f"checkpoints/{GROUP}/expdl_b/2/y": STORED_CKPTS["expdl_b/2/y"]}
    with pytest.raises(FileNotFoundError, match=r"no run records matching --runs nope\* under gs://"):
        dl(world, tmp_path / "other", runs_pattern="nope*")


# ------------------------------------------------------------------------------------------ resume
def test_second_download_skips_and_changed_files_come_again(world, tmp_path):
    dest, n = tmp_path / "res", len(no_run_ckpts(RECORDS))
    assert dl(world, dest).downloaded == n
    kept = dest / GROUP / "expdl_a" / "summary.json"
    before = kept.stat()
    s = dl(world, dest)
    assert (s.downloaded, s.skipped, s.bytes) == (0, n, 0)
    assert kept.stat().st_mtime_ns == before.st_mtime_ns and kept.stat().st_ino == before.st_ino  # untouched
    (dest / GROUP / "expdl_a" / "plots" / "loss.png").write_bytes(b"\0" * 3000)  # same size, other bytes
    (dest / GROUP / "expdl_b" / "metrics.csv").write_bytes(b"step,")  # truncated
    (dest / GROUP / "expdl_b" / "status.json").unlink()
    s = dl(world, dest)
    assert (s.downloaded, s.skipped) == (3, n - 3)
    assert read_tree(dest) == {f"{GROUP}/{k}": v for k, v in no_run_ckpts(RECORDS).items()}


def test_leftover_temp_file_is_not_taken_for_the_real_one(world, tmp_path):
    run = tmp_path / "res" / GROUP / "expdl_a"
    run.mkdir(parents=True)
    stale = run / f".status.json.0123abcd{rd.PARTIAL_SUFFIX}"  # what a killed download leaves
    stale.write_bytes(RECORDS["expdl_a/status.json"][:5])
    s = dl(world, tmp_path / "res")
    assert s.skipped == 0 and (run / "status.json").read_bytes() == RECORDS["expdl_a/status.json"]
    assert not stale.exists()  # cleaned up once the real file is in place
    assert not [p for p in (tmp_path / "res").rglob("*") if p.name.endswith(rd.PARTIAL_SUFFIX)]


def test_up_to_date_falls_back_to_md5_then_size(world, tmp_path):
    bucket, prefix = gcs.split_gcs(f"{world.root}/runs/{GROUP}/expdl_a/plots/loss.png")
    blob = gcs.client().bucket(bucket).get_blob(prefix)
    assert blob.crc32c and blob.md5_hash  # the emulator gives both: check each path explicitly
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(RECORDS["expdl_a/plots/loss.png"])
    bad.write_bytes(b"\1" * 3000)
    assert rd.is_up_to_date(blob, str(good)) and not rd.is_up_to_date(blob, str(bad))
    blob._properties.pop("crc32c")  # as a store without crc32c would list it
    assert rd.is_up_to_date(blob, str(good)) and not rd.is_up_to_date(blob, str(bad))
    blob._properties.pop("md5Hash")  # no hash at all: size is all there is
    assert rd.is_up_to_date(blob, str(bad)) and not rd.is_up_to_date(blob, str(tmp_path / "missing"))


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a/.."])
def test_object_names_escaping_dest_are_refused(tmp_path, rel):
    with pytest.raises(ValueError, match="outside"):
        rd.local_path(str(tmp_path), rel, "gs://b/runs/g")
    assert rd.local_path(str(tmp_path), "r/a..b") == str(tmp_path / "r" / "a..b")


# ------------------------------------------------------------------------------------------ errors
def test_unknown_group(world, tmp_path, capsys):
    assert cli(world, "nosuchgroup", "--dest", str(tmp_path / "res")) == 2
    assert "unknown group 'nosuchgroup'" in one_error_line(capsys)
    assert not (tmp_path / "res").exists()


def test_unwritable_dest_leaves_it_alone(world, tmp_path, capsys):
    dest = tmp_path / "res"
    (dest / GROUP).mkdir(parents=True)
    old = dest / GROUP / "notes.txt"
    old.write_bytes(b"mine")
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    if os.geteuid() == 0:  # root ignores modes, but not a file where a folder must go
        (dest / "file").write_bytes(b"x")
        before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
        target = dest / "file"
    else:
        (dest / GROUP).chmod(0o500)
        target = dest
    try:
        assert cli(world, GROUP, "--dest", str(target)) == 2
        line = one_error_line(capsys)
    finally:
        (dest / GROUP).chmod(0o700)
    assert f"cannot write to {target}/" in line
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before and old.read_bytes() == b"mine"


def test_no_credentials_says_how_to_log_in_without_network(world, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")

    def no_network(*a, **k):
        raise AssertionError("touched the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert cli(world, GROUP, "--dest", str(tmp_path / "res")) == 2
    line = one_error_line(capsys)
    assert "gcloud auth application-default login" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line
    assert "gs://kellen-test" in line and not (tmp_path / "res").exists()


def test_local_output_root_needs_no_download(world, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"local at .*/runs/exploc and need no download"):
        rd.download("exploc", dest=str(tmp_path), spec_dir=world.specs)
    assert cli(world, GROUP, "--output-root", str(tmp_path / "mine"), "--dest", str(tmp_path / "res")) == 2
    assert f"are local at {tmp_path / 'mine' / GROUP} and need no download" in one_error_line(capsys)


def test_empty_prefix(world, tmp_path, capsys):
    empty = f"gs://kellen-test/{uuid.uuid4().hex}/runs"
    assert cli(world, GROUP, "--output-root", empty, "--dest", str(tmp_path / "res")) == 2
    assert f"no run records under {empty}/{GROUP}/" in one_error_line(capsys)
    assert not (tmp_path / "res").exists()


# --------------------------------------------------------------------------------------------- CLI
def test_equivalent_commands(world):
    r = world.root
    assert rd.equivalent_commands(GROUP, "results/", True, spec_dir=world.specs) == [
        f"gsutil -m cp -r {r}/runs/{GROUP} results/", f"gcloud storage cp -r {r}/runs/{GROUP} results/",
        "mkdir -p results/checkpoints", f"gsutil -m cp -r {r}/checkpoints/{GROUP} results/checkpoints/",
        f"gcloud storage cp -r {r}/checkpoints/{GROUP} results/checkpoints/"]
    assert rd.equivalent_commands(GROUP, "results", False, spec_dir=world.specs) == [
        f"gsutil -m rsync -r -x '^[^/]+/checkpoints/' {r}/runs/{GROUP} results/{GROUP}",
        f"gcloud storage rsync -r -x '^[^/]+/checkpoints/' {r}/runs/{GROUP} results/{GROUP}"]


def test_cli_subprocess(world, tmp_path):
    code = ("import argparse,sys; from kellen.experiments import results_download as r; "
            "p=argparse.ArgumentParser(); s=p.add_subparsers(dest='command'); r.add_parser(s); "
            "a=p.parse_args(sys.argv[1:]); sys.exit(a.fn(a))")
    env = {**os.environ, **world.env}
    dest = tmp_path / "res"
    cmd = [sys.executable, "-c", code, "results", "download", GROUP, "--dest", str(dest), "--with-checkpoints",
           "--runs", "expdl_a", "--spec-dir", world.specs]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr  # no progress bar off a terminal
    n = sum(k.startswith("expdl_a/") for k in RECORDS) + 1
    lines = p.stdout.splitlines()
    assert lines[0] == (f"downloaded {n} files (0.0 MB), skipped 0 up to date, 1 runs, "
                        f"to {dest}/{GROUP}/ and {dest}/checkpoints/{GROUP}/")
    assert lines[1] == "equivalent:" and lines[2].startswith("  gsutil -m cp -r ")
    assert read_tree(dest)[f"checkpoints/{GROUP}/expdl_a/1/x"] == STORED_CKPTS["expdl_a/1/x"]
    assert len(read_tree(dest)) == n
