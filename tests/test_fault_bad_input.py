"""Fault-injection scenario 9: bad input, one table across every entry point.

Each case is a real subprocess (the `kellen` console script, `python pretrain_jax.py --config-dir ...`,
`python kellen/experiments/run_experiment_batch.py`) given one bad spec, config, override, dataset,
fixture or command-line argument. Every case must:

- exit with code 2;
- write exactly one line to stderr, naming the offending file or key, and nothing to stdout (so no
  training "step" lines, no usage block, no traceback);
- fail before anything runs: within a timeout, and without creating or changing anything in the
  workspace -- the output root with one existing run (config.yaml, status.json, logs/metrics.jsonl,
  checkpoints/1/), the configs, specs, datasets and fixtures -- compared by bytes and mtime.

Several of these are also tested where their feature is (test_pretrain_cli.py, test_experiment_specs.py,
test_data_cli.py, test_batch_runner.py, test_parity.py, ...); this is the consolidated table.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrain_helpers import REPO, clean_env

KELLEN = str(pathlib.Path(sys.executable).with_name("kellen"))
TOOLS = {
    "kellen": [KELLEN],
    "pretrain": [sys.executable, str(REPO / "pretrain_jax.py"), "--config-dir", "{cfg}"],
    "batch": [sys.executable, str(REPO / "kellen" / "experiments" / "run_experiment_batch.py")],
}
TIMEOUT_S = 90  # each case fails at startup: seconds, even on a loaded machine
TINY = "+experiment=tiny output_root={runs}"  # pretrain: the tiny preset, runs under the workspace
RUN_OPTS = "--config-dir {cfg} --output-root {runs} --logs-dir {ws}/batches"  # kellen run / batch

# (id, command: tool alias then arguments with {placeholders}, strings the stderr line must contain)
CASES = [
    # --- experiment group specs (kellen generate / list / guide over a spec dir)
    ("spec-unknown-key", "kellen generate exp95 --spec-dir {specs} --out {ws}/gen", ["exp95.yaml", "epochz"]),
    ("spec-unknown-variable-path", "kellen generate exp96 --spec-dir {specs} --out {ws}/gen",
     ["exp96.yaml", "arch.hidden_sise"]),
    ("spec-invalid-yaml", "kellen generate exp97 --spec-dir {specs} --out {ws}/gen", ["exp97.yaml", "line 3"]),
    ("spec-extends-missing-base", "kellen generate exp98 --spec-dir {specs} --out {ws}/gen", ["exp98.yaml", "_nope"]),
    ("spec-derived-unsafe-expression", "kellen generate exp99 --spec-dir {specs} --out {ws}/gen",
     ["exp99.yaml", "derived.lr"]),
    ("spec-unknown-group", "kellen generate nope --spec-dir {specs} --out {ws}/gen", ["nope.yaml"]),
    ("list-unknown-group", "kellen list nope --spec-dir {specs}", ["nope.yaml"]),
    ("guide-unknown-group", "kellen guide nope --spec-dir {specs} --out {ws}/guides --output-root {runs}",
     ["nope.yaml"]),
    # --- Hydra configs for pretrain_jax.py
    ("config-unknown-key", "pretrain --config-name bad_key output_root={runs}", ["bad_key", "'epoch'"]),
    ("config-missing", "pretrain --config-name nope_cfg output_root={runs}", ["nope_cfg"]),
    ("config-invalid-yaml", "pretrain --config-name broken output_root={runs}", ["broken.yaml"]),
    ("config-missing-preset", "pretrain +experiment=nope output_root={runs}", ["experiment/nope"]),
    # --- command-line overrides
    ("override-unknown-key", f"pretrain {TINY} epoch=5", ["'epoch'"]),
    ("override-append-unknown-key", f"pretrain {TINY} +epoch=5", ["'epoch'"]),
    ("override-wrong-type", f"pretrain {TINY} epochs=lots", ["epochs=lots"]),
    ("override-unknown-nested-key", f"pretrain {TINY} arch.hidden_sise=8", ["arch.hidden_sise"]),
    ("override-bad-syntax", f"pretrain {TINY} epochs=[1,", ["epochs=[1,"]),
    ("override-bad-value", f"pretrain {TINY} data_paths=[{{tiny}}] eval_interval=3", ["eval_interval=3"]),
    ("pretrain-unknown-flag", f"pretrain --nope {TINY}", ["--nope"]),
    ("run-unknown-key", f"kellen run tiny_a epoch=5 {RUN_OPTS}", ["tiny_a", "'epoch'"]),
    ("run-wrong-type", f"kellen run tiny_a arch.hidden_size=big {RUN_OPTS}", ["hidden_size", "big"]),
    ("run-missing-config", f"kellen run nope_cfg {RUN_OPTS}", ["nope_cfg.yaml"]),
    ("batch-unknown-key", f"batch --pattern tiny epoch=5 {RUN_OPTS}", ["tiny_a", "'epoch'"]),
    ("batch-pattern-matches-nothing", f"batch --pattern zzz* {RUN_OPTS}", ["'zzz*'"]),
    ("batch-invalid-pattern", f"batch --pattern a/b {RUN_OPTS}", ["'a/b'"]),
    # --- datasets
    ("data-path-nowhere", f"pretrain {TINY} data_paths=[{{ws}}/nowhere]", ["nowhere/train/dataset.json"]),
    ("data-missing-dataset-json", f"pretrain {TINY} data_paths=[{{data}}/nojson]", ["nojson/train/dataset.json"]),
    ("data-corrupt-dataset-json", f"pretrain {TINY} data_paths=[{{data}}/corrupt]", ["corrupt/train/dataset.json"]),
    ("data-dataset-json-missing-key", f"pretrain {TINY} data_paths=[{{data}}/nokey]",
     ["nokey/train/dataset.json", "seq_len"]),
    ("data-does-not-fit-model", f"pretrain {TINY} data_paths=[{{tiny}}] data_paths_test=[{{data}}/maze]",
     ["maze/test/dataset.json", "seq_len"]),
    ("data-corrupt-on-existing-run", f"pretrain {TINY} group=exp90 run_name=exp90_a data_paths=[{{data}}/corrupt]",
     ["corrupt/train/dataset.json"]),
    ("data-info-corrupt", "kellen data info {data}/corrupt", ["corrupt/train/dataset.json"]),
    ("data-build-onto-existing-run", "kellen data sudoku --out {runs}/exp90/exp90_a --generate 4", ["exp90_a"]),
    # --- fixtures: parity and import-torch
    ("parity-missing-file", "kellen parity {fx}/missing.npz", ["missing.npz"]),
    ("parity-corrupt-file", "kellen parity {fx}/corrupt.npz", ["corrupt.npz"]),
    ("parity-missing-array", "kellen parity {fx}/partial.npz", ["partial.npz", "meta_json"]),
    ("import-torch-missing-file", "kellen import-torch {fx}/missing.npz {ws}/imported", ["missing.npz"]),
    ("import-torch-corrupt-file", "kellen import-torch {fx}/corrupt.npz {ws}/imported", ["corrupt.npz"]),
    ("import-torch-unknown-arch-key", "kellen import-torch {fx}/state.npz {ws}/imported --arch bogus=1", ["bogus"]),
    ("import-torch-onto-existing-run", "kellen import-torch {fx}/state.npz {runs}/exp90/exp90_a", ["exp90_a"]),
    # --- command-line arguments
    ("cli-unknown-flag", "kellen status --nope", ["--nope"]),
    ("cli-no-command", "kellen", ["command"]),
    ("cli-unknown-command", "kellen frobnicate", ["frobnicate"]),
    ("data-sudoku-missing-out", "kellen data sudoku --generate 4", ["--out"]),
    ("data-sudoku-generate-zero", "kellen data sudoku --out {ws}/ds --generate 0", ["--generate"]),
    ("data-sudoku-generate-not-int", "kellen data sudoku --out {ws}/ds --generate abc", ["--generate", "abc"]),
    ("data-sudoku-negative-num-aug", "kellen data sudoku --out {ws}/ds --generate 4 --num-aug -1", ["--num-aug"]),
    ("data-sudoku-min-clues-range", "kellen data sudoku --out {ws}/ds --generate 4 --min-clues 90", ["min_clues"]),
    ("data-sudoku-negative-test-generate", "kellen data sudoku --out {ws}/ds --generate 4 --test-generate -3",
     ["--test-generate"]),
    ("compare-unknown-group", "kellen compare nope --spec-dir {specs} --out {ws}/reports", ["nope"]),
    ("compare-missing-group", "kellen compare --spec-dir {specs}", ["GROUP"]),
    ("diff-missing-run", "kellen diff exp90_a", ["RUN_B"]),
    ("diff-unknown-run", "kellen diff exp90_a nope_b --output-root {runs} --results {ws}/results --config-dir {cfg}",
     ["nope_b"]),
    ("results-download-unknown-group", "kellen results download nope --spec-dir {specs} --dest {ws}/results",
     ["nope"]),
    ("results-download-missing-group", "kellen results download --spec-dir {specs}", ["GROUP"]),
    ("status-invalid-pattern", "kellen status a/b --output-root {runs} --config-dir {cfg}", ["'a/b'"]),
    ("status-watch-not-a-number", "kellen status --watch abc --output-root {runs}", ["--watch", "abc"]),
]

TINY_A = """defaults:
  - cfg_pretrain
  - _self_
group: exp90
global_batch_size: 16
epochs: 4
eval_interval: 2
data_paths: [{tiny}]
compilation_cache_dir: null
arch: {{hidden_size: 32, num_heads: 4, H_cycles: 2, L_cycles: 2, L_layers: 1, halt_max_steps: 3,
        puzzle_emb_len: 1, forward_dtype: float32}}
"""

BAD_SPECS = {
    "exp95": "id: exp95\nepochz: 3\nvariables:\n  grid:\n    lr: [1.0e-4, 3.0e-4]\n",
    "exp96": "id: exp96\nvariables:\n  grid:\n    arch.hidden_sise: [8, 16]\n",
    "exp97": "id: exp97\nvariables: [unclosed\n",
    "exp98": "id: exp98\nextends: _nope\nvariables:\n  grid:\n    lr: [1.0e-4, 3.0e-4]\n",
    "exp99": "id: exp99\nvariables:\n  grid:\n    global_batch_size: [16, 32]\n"
             "derived:\n  lr: __import__('os').getcwd()\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sudoku):
    """The workspace every case runs in (its cwd): an output root holding one existing run, configs,
    specs, good and bad datasets and fixtures. Returns (placeholders, env)."""
    ws = tmp_path_factory.mktemp("bad-input") / "ws"
    runs = ws / "runs"
    run = runs / "exp90" / "exp90_a"
    (run / "logs").mkdir(parents=True)
    (run / "checkpoints" / "1").mkdir(parents=True)
    (run / "config.yaml").write_text("group: exp90\nepochs: 4\n")
    (run / "status.json").write_text(json.dumps({"state": "completed", "step": 8, "total": 8}))
    (run / "logs" / "metrics.jsonl").write_text('{"step": 8, "train/lm_loss": 1.5}\n')
    (run / "checkpoints" / "1" / "state").write_text("weights")

    cfg = ws / "configs"
    shutil.copytree(REPO / "tests" / "configs", cfg)  # bad_key.yaml, experiment/tiny.yaml
    (cfg / "broken.yaml").write_text("defaults:\n  - cfg_pretrain\n  - _self_\nepochs: [1,\n")
    (cfg / "tiny_a.yaml").write_text(TINY_A.format(tiny=tiny_sudoku))

    specs = ws / "specs"
    shutil.copytree(REPO / "tests" / "fixtures" / "specs", specs)
    for name, text in BAD_SPECS.items():
        (specs / f"{name}.yaml").write_text(text)

    data = ws / "data"
    data.mkdir()
    subprocess.run([KELLEN, "data", "maze", "--out", str(data / "maze"), "--generate", "4", "--size", "10"],
                   check=True, capture_output=True, timeout=300)
    for bad in ("nojson", "corrupt", "nokey"):
        shutil.copytree(tiny_sudoku, data / bad)
    os.remove(data / "nojson" / "train" / "dataset.json")
    (data / "corrupt" / "train" / "dataset.json").write_text('{"pad_id": 0, "vocab_')
    meta = json.loads((data / "nokey" / "train" / "dataset.json").read_text())
    del meta["seq_len"]
    (data / "nokey" / "train" / "dataset.json").write_text(json.dumps(meta))

    fx = ws / "fx"
    fx.mkdir()
    (fx / "corrupt.npz").write_bytes(b"not a zip archive")
    np.savez(fx / "partial.npz", foo=np.zeros(3))
    with np.load(REPO / "tests" / "fixtures" / "reference_trm" / "trm_attn_rope.npz") as z:  # a valid state_dict
        np.savez(fx / "state.npz", **{k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")})

    home = tmp_path_factory.mktemp("home")  # ~/.cache and KELLEN_CACHE away from the real ones
    env = clean_env({"HOME": str(home), "KELLEN_CACHE": str(home / "kellen-cache")})
    places = {"ws": ws, "runs": runs, "cfg": cfg, "specs": specs, "data": data, "fx": fx, "tiny": tiny_sudoku}
    return {k: str(v) for k, v in places.items()}, env


def snapshot(root):
    """Every path under root: directories, and files with their bytes and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = (fh.read(), os.stat(path).st_mtime_ns)
    return out


def command(template, places):
    tool, *args = template.split()
    return [part.format(**places) for part in TOOLS[tool] + args]


@pytest.mark.fault(9, "bad input: exit 2, one stderr line naming the file/key, nothing run or written")
@pytest.mark.parametrize("case_id, template, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_on_one_line(world, case_id, template, named):
    places, env = world
    argv = command(template, places)
    before = snapshot(places["ws"])
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=places["ws"], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    elapsed = time.monotonic() - start
    shown = (f"$ {' '.join(argv)}\nexit {proc.returncode} after {elapsed:.1f}s\n"
             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")

    assert proc.returncode == 2, shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), shown
    for needle in named:
        assert needle in lines[0], f"{needle!r} not named\n{shown}"
    assert "Traceback" not in proc.stderr, shown
    assert proc.stdout == "", shown  # no plan, no table, no training step lines

    after = snapshot(places["ws"])
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}\n{shown}"
