"""`kellen diff`: run-dir lookup, what counts as a difference, and the CLI's exits (fake run records in tmp_path)."""
import argparse
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from kellen.experiments import diff, runs

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG_A = """\
arch:
  name: trm
  hidden_size: 32
  H_cycles: 1
  loss:
    loss_type: softmax_cross_entropy
data_paths:
- data/a
lr: 0.01
ema: false
only_a: 1
run_name: run_a
checkpoint_path: null
"""

CONFIG_B = """\
arch:
  name: trm
  hidden_size: 64
  H_cycles: 1
  loss:
    loss_type: stablemax_cross_entropy
data_paths:
- data/a
- data/b
lr: 0.01
ema: 0
only_b: "[red]x"
run_name: run_b
checkpoint_path: gs://bucket/ckpt/run_b
"""


def metadata(commit="abc123", dirty=False, jax="0.10.2", branch="main"):
    return {"git": {"commit": commit, "branch": branch, "dirty": dirty, "remote": None},
            "versions": {"python": "3.11.7", "jax": jax, "numpy": "2.4.6"}, "backend": "cpu"}


def make_run(path, config=CONFIG_A, meta=None, overrides="[]\n"):
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(config)
    if meta is not False:
        (path / "metadata.json").write_text(json.dumps(meta or metadata()))
    if overrides is not None:
        (path / "overrides.yaml").write_text(overrides)
    return str(path)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="kellen")
    diff.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diff", *argv])
    return args.fn(args)


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


# --------------------------------------------------------------------------- what differs
def test_only_differing_config_keys(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", CONFIG_B)
    d = diff.diff_runs(a, b)
    assert d["a"] == a and d["b"] == b
    assert d["config"] == {
        "arch.hidden_size": {"a": 32, "b": 64},
        "arch.loss.loss_type": {"a": "softmax_cross_entropy", "b": "stablemax_cross_entropy"},
        "data_paths": {"a": ["data/a"], "b": ["data/a", "data/b"]},  # lists are one value
        "ema": {"a": False, "b": 0},  # equal in Python, different in YAML
        "only_a": {"a": 1, "b": "<missing>"},
        "only_b": {"a": "<missing>", "b": "[red]x"},
    }
    # Keys that differ for any two runs: their own section, not config differences.
    assert d["identity"] == {"run_name": {"a": "run_a", "b": "run_b"},
                             "checkpoint_path": {"a": None, "b": "gs://bucket/ckpt/run_b"}}
    assert d["git"] == {} and d["versions"] == {} and d["overrides"] == {}


def test_git_versions_and_overrides_only_when_they_differ(tmp_path):
    a = make_run(tmp_path / "a")
    same = make_run(tmp_path / "same", meta=metadata(branch="other"))  # branch is not compared
    assert diff.diff_runs(a, same)["git"] == {}
    b = make_run(tmp_path / "b", meta=metadata(commit="def456", dirty=True, jax="0.11.0"),
                 overrides="- epochs=10\n")
    d = diff.diff_runs(a, b)
    assert d["config"] == {}
    assert d["git"] == {"commit": {"a": "abc123", "b": "def456"}, "dirty": {"a": False, "b": True}}
    assert d["versions"] == {"jax": {"a": "0.10.2", "b": "0.11.0"}}
    assert d["overrides"] == {"overrides.yaml": {"a": [], "b": ["epochs=10"]}}
    # A record without metadata.json / overrides.yaml: its side is <missing>.
    c = make_run(tmp_path / "c", meta=False, overrides=None)
    d = diff.diff_runs(a, c)
    assert d["git"]["commit"] == {"a": "abc123", "b": "<missing>"}
    assert d["versions"]["python"] == {"a": "3.11.7", "b": "<missing>"}
    assert d["overrides"] == {"overrides.yaml": {"a": [], "b": "<missing>"}}


def test_identical_runs_have_no_differences(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    d = diff.diff_runs(a, b)
    assert all(d[s] == {} for s in diff.SECTIONS)
    assert run_cli([a, b]) == 0
    out = capsys.readouterr().out
    assert f"A: {a}" in out and f"B: {b}" in out and "no config differences" in out


def test_table_output(tmp_path):
    from rich.console import Console

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", CONFIG_B, meta=metadata(jax="0.11.0"))
    buf = io.StringIO()
    diff.render(diff.diff_runs(a, b), Console(file=buf, width=200))
    out = buf.getvalue()
    for text in ("config", "arch.hidden_size", "<missing>", "[red]x", "versions", "0.11.0", "identity"):
        assert text in out
    assert "no config differences" not in out
    assert not any(line.strip() == "git" for line in out.splitlines())  # git is the same: no section
    assert out.index("identity") > out.index("versions")  # identity listed last


def test_demo_configs(tmp_path):
    src = REPO / "runs" / "demo"
    if not all((src / n / "config.yaml").is_file() for n in ("demo_a", "demo_b")):
        pytest.skip("no runs/demo records here")
    for n in ("demo_a", "demo_b"):
        (tmp_path / n).mkdir()
        shutil.copy(src / n / "config.yaml", tmp_path / n / "config.yaml")
    d = diff.diff_runs(str(tmp_path / "demo_a"), str(tmp_path / "demo_b"))
    assert d["identity"]["run_name"] == {"a": "demo_a", "b": "demo_b"}
    assert "run_name" not in d["config"]


# --------------------------------------------------------------------------- finding run dirs
def test_find_by_name_results_then_output_root(tmp_path):
    assert runs.config_file("exp77_a") is None  # no config: group = default_group -> exp77
    results, root = tmp_path / "results", tmp_path / "out"
    in_root = make_run(root / "exp77" / "exp77_a")
    assert diff.find_run_dir("exp77_a", str(results), str(root)) == in_root
    in_results = make_run(results / "exp77" / "exp77_a")
    assert diff.find_run_dir("exp77_a", str(results), str(root)) == in_results  # downloaded first
    variant = make_run(root / "exp77" / "exp77_a--epochs=10")
    assert diff.find_run_dir("exp77_a--epochs=10", str(results), str(root)) == variant
    adhoc = make_run(root / "adhoc" / "zzdiff_x")
    assert diff.find_run_dir("zzdiff_x", str(results), str(root)) == adhoc


def test_find_by_name_uses_config_group_and_output_root(tmp_path):
    configs, root = tmp_path / "configs", tmp_path / "cfg_root"
    configs.mkdir()
    (configs / "zzdiff_q.yaml").write_text(f"group: mygroup\noutput_root: {root}\n")
    run = make_run(root / "mygroup" / "zzdiff_q--lr=0.1")
    found = diff.find_run_dir("zzdiff_q--lr=0.1", str(tmp_path / "results"), None, config_dir=str(configs))
    assert found == run
    with pytest.raises(ValueError, match="no run 'zzdiff_q'.*mygroup"):
        diff.find_run_dir("zzdiff_q", str(tmp_path / "results"), None, config_dir=str(configs))


def test_find_paths(tmp_path, monkeypatch):
    a = make_run(tmp_path / "x" / "a")
    assert diff.find_run_dir(a) == a
    monkeypatch.chdir(tmp_path)
    assert diff.find_run_dir("x/a") == a
    assert diff.find_run_dir("gs://bucket/runs/g/r/") == "gs://bucket/runs/g/r"
    with pytest.raises(ValueError, match="not a run dir"):
        diff.find_run_dir(str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"config\.yaml.*missing"):
        diff.diff_runs(a, str(tmp_path / "x"))


# --------------------------------------------------------------------------- CLI
def test_cli_unknown_run(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    assert run_cli([a, "exp77_nope", "--results", str(tmp_path / "r"), "--output-root", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kellen diff: error: no run 'exp77_nope'") and err.count("\n") == 1
    assert str(tmp_path / "r" / "exp77" / "exp77_nope") in err


@pytest.mark.parametrize("name,body", [("config.yaml", "arch: [1, 2\n"), ("config.yaml", "- a list\n"),
                                       ("overrides.yaml", "[oops\n"), ("metadata.json", "{not json")])
def test_cli_malformed_file(tmp_path, capsys, name, body):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    (pathlib.Path(b) / name).write_text(body)
    assert run_cli([a, b]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kellen diff: error: ") and err.count("\n") == 1
    assert os.path.join(b, name) in err


@pytest.mark.parametrize("name", ["../x", "a;rm -rf", "$(x)", "..", "a b", ".hidden", "x`id`"])
def test_cli_hostile_names(tmp_path, monkeypatch, capsys, name):
    a = make_run(tmp_path / "work" / "a")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    assert run_cli([a, name, "--results", str(tmp_path / "r"), "--output-root", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kellen diff: error: ") and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_cli_json(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", CONFIG_B)
    assert run_cli([a, b, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["arch.hidden_size"] == {"a": 32, "b": 64}
    assert set(d) == {"a", "b", *diff.SECTIONS}


def test_cli_subprocess(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", CONFIG_B)
    code = ("import argparse, sys; from kellen.experiments import diff; p = argparse.ArgumentParser(prog='kellen'); "
            "diff.add_parser(p.add_subparsers(dest='command', required=True)); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.fn(a))")
    ok = subprocess.run([sys.executable, "-c", code, "diff", a, b, "--json"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["config"]["only_a"] == {"a": 1, "b": "<missing>"}
    bad = subprocess.run([sys.executable, "-c", code, "diff", a, "a;rm -rf"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("kellen diff: error: invalid run name") and bad.stderr.count("\n") == 1


def test_cli_roots_relative_to_cwd(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "r" / "exp77" / "exp77_a")
    b = make_run(tmp_path / "o" / "exp77" / "exp77_b", CONFIG_B)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["exp77_a", "exp77_b", "--results", "r", "--output-root", "o", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["a"], d["b"]) == (a, b)
