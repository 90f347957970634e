"""Experiment group specs -> runs -> configs/<run>.yaml (kellen/experiments): expansion, validation,
generation, and that a generated file loads with `pretrain_jax.py --config-name`."""
import hashlib
import math
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from kellen.experiments import expand, generate as gen
from kellen.experiments.spec import SpecError, load_all, load_group, parse_criterion

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECS = pathlib.Path(__file__).parent / "fixtures" / "specs"


@pytest.fixture
def tree(tmp_path):
    """A copy of the configs/ tree (no generated files) with the fixture specs in configs/experiments."""
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(REPO / "configs" / "cfg_pretrain.yaml", configs)
    for sub in ("arch", "experiment"):
        shutil.copytree(REPO / "configs" / sub, configs / sub)
    shutil.copytree(SPECS, configs / "experiments")
    return configs


def run_cli(capsys, *argv):
    rc = gen.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def gen_all(capsys, configs, *extra):
    return run_cli(capsys, "generate", "--all", "--spec-dir", str(configs / "experiments"), "--out", str(configs),
                   *extra)


# ------------------------------------------------------------------------------------- expansion
def test_load_all_skips_bases_and_run_mappings(tree):
    (tree / "experiments" / "exp90.run_mapping.yaml").write_text("group: exp90\n")
    assert sorted(load_all(str(tree / "experiments"))) == ["exp90", "exp91", "exp92", "exp93"]


def test_grid_times_zip_order_names_and_derived_lr():
    g = load_group(str(SPECS / "exp90.yaml"))
    assert [r.name for r in g.runs] == [f"exp90_{c}" for c in "abcdef"]
    assert g.variables == ["global_batch_size", "arch.L_layers", "arch.L_cycles"]
    rows = [(r.values["global_batch_size"], r.values["arch.L_layers"], r.values["arch.L_cycles"]) for r in g.runs]
    assert rows == [(768, 1, 12), (768, 2, 6), (768, 4, 3), (6144, 1, 12), (6144, 2, 6), (6144, 4, 3)]
    for r in g.runs:  # exact: the same arithmetic as Python's
        assert r.values["lr"] == r.config["lr"] == 1e-4 * math.sqrt(r.values["global_batch_size"] / 6144)
    assert g.run("exp90_d").config["lr"] == 1e-4 and g.runs[0].config["lr"] == 1e-4 * math.sqrt(0.125)
    assert g.baseline_run.name == "exp90_b" and g.run("exp90_b").notes == "the paper's depth"
    assert [(c.metric, c.op, c.value, c.scope) for c in g.success_criteria] == [
        ("eval/all/exact_accuracy", ">=", 0.85, "baseline"), ("perf/step_time", "<", 2.0, "exp90_f")]


def test_extends_deep_merges_fixed_and_passes_defaults():
    g = load_group(str(SPECS / "exp90.yaml"))
    c = g.run("exp90_b").config
    assert c["arch"] == {"mlp_t": True, "hidden_size": 128, "loss": {"loss_type": "softmax_cross_entropy"},
                         "L_layers": 2, "L_cycles": 6}  # dicts merge: the base's mlp_t and loss stay
    assert c["mesh"] == {"data_axes": ["data"]}  # a list replaces the base's
    assert c["epochs"] == 1000 and c["group"] == "exp90" and c["run_name"] == "exp90_b"
    assert c["project_name"] == "TRM-Test" and c["wandb"] == {"project": "TRM-Test", "tags": ["fixture", "depth"]}
    assert c["checkpoint_path"] == "gs://test-bucket/checkpoints/exp90/exp90_b" == g.checkpoint_dir("exp90_b")
    assert g.metrics == ["eval/all/exact_accuracy"] and g.researcher == "kellen"
    chain = (SPECS / "exp90.yaml").read_bytes() + (SPECS / "_base.yaml").read_bytes()
    assert g.sha256 == hashlib.sha256(chain).hexdigest()


def test_explicit_runs_names_baseline_and_notes():
    g = load_group(str(SPECS / "exp91.yaml"))
    assert [(r.name, r.values, r.baseline, r.notes) for r in g.runs] == [
        ("exp91_fast", {"ema_rate": 0.99}, False, "quick decay"),
        ("exp91_slow", {"ema_rate": 0.999}, False, ""),
        ("exp91_off", {"ema": False}, False, "no EMA at all"),
        ("exp91_slowest", {"ema": True, "ema_rate": 0.9999}, True, "")]
    assert g.run("exp91_off").config["ema"] is False and g.run("exp91_fast").config["ema"] is True


def test_default_names_run_past_z(tmp_path):
    (tmp_path / "exp94.yaml").write_text("id: exp94\nvariables: {grid: {seed: " + str(list(range(28))) + "}}\n")
    names = [r.name for r in load_group(str(tmp_path / "exp94.yaml")).runs]
    assert names[:2] == ["exp94_a", "exp94_b"] and names[25:] == ["exp94_z", "exp94_aa", "exp94_ab"]


def test_data_prerequisites_name_and_dedupe():
    g = load_group(str(SPECS / "exp92.yaml"))
    paths = [r.config["data_paths"] for r in g.runs]
    assert paths == [["gs://test-bucket/data/sudoku-extreme-n1000-aug10-s0"]] * 2 + \
        [["gs://test-bucket/data/sudoku-extreme-n1000-aug1000-s0"]] * 2
    assert "data_build" not in g.runs[0].config and "data" not in g.runs[0].config  # a csv set on gs://
    assert [r.config["epochs"] for r in g.runs] == [90000, 90000, 50000, 50000]  # derived from data.num_aug
    prereq = expand.data_prerequisites(g)
    assert [p for p, _ in prereq] == ["gs://test-bucket/data/sudoku-extreme-n1000-aug10-s0",
                                      "gs://test-bucket/data/sudoku-extreme-n1000-aug1000-s0"]
    assert prereq[1][1] == {"kind": "sudoku", "csv": "data/raw/sudoku-extreme", "subsample_size": 1000,
                            "num_aug": 1000, "seed": 0}
    assert expand.data_build_argv(*prereq[1]) == [
        "data", "sudoku", "--out", prereq[1][0], "--csv", "data/raw/sudoku-extreme", "--subsample-size", "1000",
        "--num-aug", "1000", "--seed", "0"]
    maze = load_group(str(SPECS / "exp93.yaml")).runs[0]  # generated, local: built on first use
    assert maze.config["data_paths"] == ["data/maze-gen200-t20-sz10-pl0-s0"]
    assert maze.config["data_build"] == {"kind": "maze", "generate": 200, "test_generate": 20, "seed": 0,
                                         "size": 10, "min_path_len": 0, "aug": False}


@pytest.mark.parametrize("expr,why", [
    ("__import__('os')", "not allowed"), ("'a' * 3", "only numbers"), ("sqrt(4).real", "attribute access"),
    ("lr / 0", "division by zero"), ("nope * 2", "unknown name 'nope'"), ("lr if lr else 1", "IfExp"),
    ("arch.puzzle_emb_ndim * 2", "None, not a number"), ("10 ** 1000", "too large"), ("sqrt", "call it"),
])
def test_safe_evaluator_refuses(tmp_path, expr, why):
    (tmp_path / "exp95.yaml").write_text(f'id: exp95\nvariables: {{grid: {{seed: [0]}}}}\nderived: {{lr: "{expr}"}}\n')
    with pytest.raises(SpecError) as e:
        load_group(str(tmp_path / "exp95.yaml"))
    assert len(e.value.problems) == 1 and "exp95.yaml: derived.lr: " in str(e.value) and why in str(e.value)


def test_yaml_writer_round_trips():
    data = {"s": ["1e-4", "yes", "null", "~", "a: b", "a #b", "012", "-x", "", "gs://b/x", "${.hidden_size}",
                  "multi\nline 'q' \"d\"", "\u00fcber"], "f": [1e-05, 3.535533905932738e-05, 1e20, -0.0, float("inf")],
            "n": {"y": None, "t": True, "e": [], "d": {}, "i": 12345678901234567890}, "l": [{"p": 1, "q": [[2, 3]]}]}
    from kellen.experiments.spec import read_yaml
    assert read_yaml(gen.dump(data).encode()) == data == yaml.safe_load(gen.dump(data))


def test_criteria_parse():
    c = parse_criterion("eval/hard/exact_accuracy > 0.5 for any")
    assert (c.metric, c.op, c.value, c.scope, c.holds(0.6), c.holds(0.5)) == (
        "eval/hard/exact_accuracy", ">", 0.5, "any", True, False)
    assert parse_criterion("train/lm_loss <= 1e-2").scope == "all"


# ------------------------------------------------------------------------------------- generation
def test_generated_config_loads_through_pretrain_jax(tree, capsys):
    rc, out, err = gen_all(capsys, tree)
    assert rc == 0 and err == [] and "4 groups, 15 runs: 19 written, 0 unchanged" in out
    text = (tree / "exp90_b.yaml").read_text()
    assert text.startswith("# Generated from configs/experiments/exp90.yaml (spec sha256 ")
    assert "\ndefaults:\n- cfg_pretrain\n- _self_\n" in text
    mapping = yaml.safe_load((tree / "experiments" / "exp92.run_mapping.yaml").read_text())
    assert mapping["runs"]["exp92_c"]["data_path"] == "gs://test-bucket/data/sudoku-extreme-n1000-aug1000-s0"
    for name, check in [("exp90_b", lambda c: (c["lr"], c["arch"]["L_layers"], c["arch"]["mlp_t"],
                                               c["mesh"]["data_axes"], c["group"], c["run_name"]) ==
                         (1e-4 * math.sqrt(768 / 6144), 2, True, ["data"], "exp90", "exp90_b")),
                        ("exp93_a", lambda c: c["data_build"]["kind"] == "maze" and c["arch"]["hidden_size"] == 32)]:
        r = subprocess.run([sys.executable, "pretrain_jax.py", "--config-path", str(tree), "--config-name", name,
                            "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert check(yaml.safe_load(r.stdout)), r.stdout


def test_regenerate_is_idempotent_and_check_reports_changes(tree, capsys):
    assert gen_all(capsys, tree)[0] == 0
    before = snapshot(tree)
    rc, out, _ = gen_all(capsys, tree)
    assert rc == 0 and snapshot(tree) == before and "0 written, 19 unchanged" in out
    assert gen_all(capsys, tree, "--check")[0] == 0
    spec = tree / "experiments" / "exp91.yaml"
    spec.write_text(spec.read_text().replace("ema_rate: [0.99, 0.999]", "ema_rate: [0.95, 0.999]"))
    before = snapshot(tree)
    rc, out, _ = gen_all(capsys, tree, "--check")
    assert rc == 1 and snapshot(tree) == before  # only the changed run and the mapping; same bodies stay
    assert [l.split("/")[-1] for l in out.splitlines()[:-1]] == ["exp91_fast.yaml", "exp91.run_mapping.yaml"]
    assert gen_all(capsys, tree)[0] == 0 and "ema_rate: 0.95" in (tree / "exp91_fast.yaml").read_text()


def test_hand_edit_is_an_error_unless_forced(tree, capsys):
    assert gen_all(capsys, tree)[0] == 0
    edited = tree / "exp90_a.yaml"
    edited.write_text(edited.read_text().replace("epochs: 1000", "epochs: 5"))
    spec = tree / "experiments" / "exp90.yaml"
    spec.write_text(spec.read_text().replace("baseline: exp90_b", "baseline: exp90_c"))
    before = snapshot(tree)
    rc, _, err = gen_all(capsys, tree)
    assert rc == 2 and any(l.startswith(f"{edited}: edited by hand") for l in err), err
    assert {k: v for k, v in snapshot(tree).items() if "exp90" in k} == \
        {k: v for k, v in before.items() if "exp90" in k}
    assert gen_all(capsys, tree, "--force")[0] == 0 and "epochs: 1000" in edited.read_text()


def test_file_without_header_is_never_overwritten(tree, capsys):
    mine = tree / "exp91_off.yaml"
    mine.write_text("epochs: 3\n")
    for extra in ((), ("--force",)):
        rc, _, err = gen_all(capsys, tree, *extra)
        assert rc == 2 and f"{mine}: not a generated file" in err[0] and mine.read_text() == "epochs: 3\n"
        assert not (tree / "exp91_fast.yaml").exists()  # nothing of that group


def test_stale_runs_reported_and_removed_with_force(tree, capsys):
    assert gen_all(capsys, tree)[0] == 0
    spec = tree / "experiments" / "exp92.yaml"
    spec.write_text(spec.read_text().replace("seed: [0, 1]", "seed: [0]"))
    rc, out, _ = gen_all(capsys, tree)
    assert rc == 0 and "stale" in out and (tree / "exp92_d.yaml").exists()
    rc, out, _ = gen_all(capsys, tree, "--force")
    assert rc == 0 and not (tree / "exp92_c.yaml").exists() and not (tree / "exp92_d.yaml").exists()


def test_generate_named_groups_only(tree, capsys):
    rc, out, _ = run_cli(capsys, "generate", "exp91", "--spec-dir", str(tree / "experiments"))  # --out: its parent
    assert rc == 0 and sorted(p.name for p in tree.glob("exp9*.yaml")) == [
        "exp91_fast.yaml", "exp91_off.yaml", "exp91_slow.yaml", "exp91_slowest.yaml"]
    rc, _, err = run_cli(capsys, "generate", "exp99", "_base", "--spec-dir", str(tree / "experiments"))
    assert rc == 2 and [l.split(": ", 1)[1] for l in err] == ["no such spec", "a base for `extends`, not a group"]
    assert load_group("exp91", str(tree / "experiments")).id == "exp91"


def test_list(tree, capsys):
    rc, out, _ = run_cli(capsys, "list", "--spec-dir", str(tree / "experiments"))
    assert rc == 0 and out.splitlines()[1].split() == ["exp90", "6", "exp90_b", "Depth", "vs", "batch"]
    rc, out, _ = run_cli(capsys, "list", "exp91", "--spec-dir", str(tree / "experiments"))
    assert out.splitlines()[0].split() == ["run", "base", "ema_rate", "ema", "notes"]
    assert out.splitlines()[4].split() == ["exp91_slowest", "*", "0.9999", "True"]


# ---------------------------------------------------------------------------------- bad inputs
GRID = "variables: {grid: {seed: [0, 1]}}\n"
BAD = [  # (spec text, the one line expected after "<file>: ")
    ("id: exp95\nvariables: {grid: {seed: [0, 1]}\n", "line 3: not valid YAML"),
    ("id: exp95\nhypothesys: x\n" + GRID, "hypothesys: not a spec key"),
    ("id: exp95\ntags: depth\n" + GRID, "tags: expected a list of strings, got str"),
    ("id: exp95\nvariables: {zip: {arch.L_layerz: [1, 2], arch.L_cycles: [6, 3]}}\n",
     "variables.zip.arch.L_layerz: not a config key (ArchConfig has no 'L_layerz'; did you mean 'L_layers'?)"),
    ("id: exp95\nvariables: {grid: {global_batch_size: [64, big]}}\n",
     "variables.grid.global_batch_size: wrong type (PretrainConfig.global_batch_size is int)"),
    ("id: exp95\nfixed: {arch: {hidden_sise: 8}}\n" + GRID, "fixed.arch.hidden_sise: not a config key"),
    ("id: exp95\nvariables: {zip: {arch.L_layers: [1, 2], arch.L_cycles: [6]}}\n",
     "variables.zip: lists of unequal length (arch.L_layers: 2, arch.L_cycles: 1)"),
    ("id: exp95\nnames: [exp95_x, exp95_x]\n" + GRID, "names[1]: run name 'exp95_x' appears twice"),
    ("id: exp95\nnames: [exp95_x, exp95 y]\n" + GRID, "names[1]: run name 'exp95 y' has characters outside"),
    ("id: exp95\nnames: [exp95_x]\n" + GRID, "names: 1 names for 2 runs"),
    ("id: exp96\n" + GRID, "id: 'exp96' is not the file's stem 'exp95'"),
    ("id: exp95\nderived: {lr: 1 / (seed - seed)}\n" + GRID, "derived.lr: division by zero (run exp95_a)"),
    ("id: exp95\nsuccess_criteria: [eval/all/exact_acc >= 0.8]\n" + GRID,
     "success_criteria[0]: unknown metric 'eval/all/exact_acc'"),
    ("id: exp95\nsuccess_criteria: [eval/all/accuracy >= 0.8 for exp95_z]\n" + GRID,
     "success_criteria[0]: 'eval/all/accuracy >= 0.8 for exp95_z': no run named 'exp95_z'"),
    ("id: exp95\nsuccess_criteria: [accuracy is high]\n" + GRID, "success_criteria[0]: cannot parse"),
    ("id: exp95\nvariables: {}\n", "variables: empty grid"),
    ("id: exp95\nbaseline: exp95_q\n" + GRID, "baseline: no run named 'exp95_q'"),
    ("id: exp95\nnotes: {exp95_q: hm}\n" + GRID, "notes.exp95_q: no such run"),
    ("id: exp95\nextends: _nope\n" + GRID, "extends: _nope: no such spec"),
    ("id: exp95\nvariables: {grid: {data.num_agu: [1]}}\ndata: {kind: sudoku, generate: 10}\n",
     "variables.grid.data.num_agu: not a data key"),
    ("id: exp95\nvariables: {grid: {run_name: [a]}}\n", "variables.grid.run_name: set by the generator"),
    ("id: exp95\nvariables: {runs: [{values: {exp90_a: 1}}]}\n", "variables.runs[0].values.exp90_a: not a config key"),
    ("id: exp95\nfixed: {project_name: '${nope}'}\n" + GRID,  # found by composing exp95_a with Hydra
     "fixed.project_name: Hydra cannot load the generated config exp95_a.yaml: Interpolation key 'nope' not found"),
]


@pytest.mark.parametrize("text,line", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_and_key_and_nothing_is_written(tree, capsys, text, line):
    spec = tree / "experiments" / "exp95.yaml"
    spec.write_text(text)
    before = snapshot(tree)
    rc, out, err = gen_all(capsys, tree)
    assert rc == 2 and out == ""
    assert len(err) == 1 and err[0].startswith(f"{spec}: {line}"), err
    assert snapshot(tree) == before


def test_cross_group_problems(tree, capsys):
    exp = tree / "experiments"
    (exp / "exp95.yaml").write_text("id: exp95\nnames: [exp90_a]\nvariables: {grid: {seed: [0]}}\n")
    (exp / "exp96.yaml").write_text("id: exp93\n" + GRID)  # a second file with exp93's id
    before = snapshot(tree)
    rc, _, err = gen_all(capsys, tree)
    assert rc == 2 and snapshot(tree) == before
    assert err == [f"{exp / 'exp95.yaml'}: names: run 'exp90_a' is also a run of exp90 ({exp / 'exp90.yaml'})",
                   f"{exp / 'exp96.yaml'}: id: 'exp93' is not the file's stem 'exp96'",
                   f"{exp / 'exp96.yaml'}: id: 'exp93' is also the id of {exp / 'exp93.yaml'}"]


def test_all_problems_are_reported_together(tree, capsys):
    exp = tree / "experiments"
    (exp / "exp95.yaml").write_text("id: exp95\ntags: depth\nfixed: {epoch: 5}\n"
                                    "variables: {grid: {arch.hidden_size: [small]}}\n")
    (exp / "exp96.yaml").write_text("id: exp96\nderived: {lr: lr * nope}\n" + GRID)
    before = snapshot(tree)
    rc, _, err = gen_all(capsys, tree)
    assert rc == 2 and snapshot(tree) == before
    assert [l.split(": ")[1] for l in err] == ["tags", "fixed.epoch", "variables.grid.arch.hidden_size",
                                               "derived.lr"], err
