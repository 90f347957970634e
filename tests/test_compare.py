"""kellen compare (records.py, compare.py, compare_plots.py) and kellen guide --results (report.py):
tables, plots, the scaling fit, criteria with measured values, the experiment log, bad records
and bad input. Run records are written by the trainer's own summary code from synthetic metrics."""
import csv
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

from kellen.experiments import compare, compare_plots, records, spec
from kellen.train import summary as summary_mod

A, B, C = 0.95, 30.0, 0.5  # the true scaling law of the synthetic runs: acc = A - B * params^-C
SIZES = {"exp95_a": (64, 1.0e5), "exp95_b": (128, 4.0e5), "exp95_c": (256, 1.6e6), "exp95_d": (512, 6.4e6),
         "exp95_e": (1024, 2.56e7)}

SPEC = textwrap.dedent("""\
    id: exp95
    name: Size sweep
    question: Does accuracy follow a power law in params?
    hypothesis: Saturating power law.
    output_root: {root}
    variables:
      grid:
        arch.hidden_size: [64, 128, 256, 512, 1024]
    baseline: exp95_c
    success_criteria:
      - eval/all/exact_accuracy >= 0.9 for baseline
      - eval/all/exact_accuracy >= 0.9 for all
    """)


def law(params):
    return A - B * params ** -C


def write_record(d, hidden, params, final_acc, state="completed", steps=100, speed=1000.0, summary=True):
    """A run dir as the trainer leaves it: config.yaml, logs/metrics.jsonl, summary.json, status.json."""
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"arch:\n  hidden_size: {hidden}\n  mlp_t: true\nepochs: 10\ngroup: exp95\n")
    rows = [{"step": 0, "num_params": int(params), "elapsed": 1.0}]
    for s in range(10, steps + 1, 10):
        rows.append({"step": s, "train/exact_accuracy": final_acc + 0.02, "train/lm_loss": 1.0 / s,
                     "perf/examples_per_sec": speed, "perf/mfu": 0.25, "elapsed": s * 2.0})
        if s % 50 == 0:
            acc = final_acc * s / steps
            rows.append({"step": s, "eval/all/exact_accuracy": acc, "eval/all/accuracy": min(1.0, acc + 0.05),
                         "elapsed": s * 2.0 + 1})
    with open(os.path.join(d, "logs", "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if summary:
        summary_mod.write_summary(rows, os.path.join(d, "summary.json"))
    with open(os.path.join(d, "status.json"), "w") as f:
        json.dump({"state": state, "step": steps, "total": steps, "metrics": {}, "heartbeat_unix": 4e9}, f)
    return rows


@pytest.fixture
def group_tree(tmp_path):
    """A spec dir with exp95 and its five runs' records under <tmp>/runs/exp95/."""
    spec_dir, root = tmp_path / "specs", tmp_path / "runs"
    spec_dir.mkdir()
    (spec_dir / "exp95.yaml").write_text(SPEC.format(root=root))
    for i, (name, (hidden, params)) in enumerate(SIZES.items()):
        write_record(str(root / "exp95" / name), hidden, params, law(params), speed=4000.0 / (i + 1))
    return spec.load_group("exp95", str(spec_dir)), spec_dir, root


def test_rows_have_every_column(group_tree):
    group, _, root = group_tree
    rows = compare.compare_rows(group, records.load_group_results(group, str(root)))
    assert [r["run"] for r in rows] == list(SIZES)
    c = rows[2]
    assert c["arch.hidden_size"] == 256 and c["params"] == int(1.6e6) and c["state"] == "completed"
    assert c["final_exact_accuracy"] == pytest.approx(law(1.6e6))
    assert c["best_exact_accuracy"] == pytest.approx(law(1.6e6)) and c["best_step"] == 100
    assert c["final_accuracy"] == pytest.approx(law(1.6e6) + 0.05)
    # train rows after the step-50 eval average final_acc + 0.02
    assert c["train_eval_gap"] == pytest.approx(0.02)
    assert c["steps_to_0.80"] == 100 and c["seconds_to_0.80"] == pytest.approx(201.0)
    assert c["examples_per_sec"] == pytest.approx(4000.0 / 3) and c["mfu"] == pytest.approx(0.25)
    assert c["wall_clock_seconds"] == pytest.approx(201.0) and c["steps"] == 100
    # faster runs are less accurate here, so every run is on the accuracy/speed frontier
    assert all(r["pareto"] for r in rows)


def test_pareto_front_drops_dominated_runs():
    rows = [{"run": "fast", "examples_per_sec": 10.0, "final_exact_accuracy": 0.5},
            {"run": "good", "examples_per_sec": 5.0, "final_exact_accuracy": 0.9},
            {"run": "worse", "examples_per_sec": 4.0, "final_exact_accuracy": 0.8},
            {"run": "none", "examples_per_sec": None, "final_exact_accuracy": 0.99}]
    assert compare.pareto_front(rows) == ["fast", "good"]


def test_scaling_fit_recovers_the_law():
    fit = compare_plots.scaling_fit([(p, law(p)) for _, p in SIZES.values()])
    assert fit["a"] == pytest.approx(A, abs=1e-4) and fit["c"] == pytest.approx(C, abs=1e-3)
    assert fit["b"] == pytest.approx(B, rel=1e-2) and fit["rmse"] < 1e-5 and fit["points"] == 5
    assert "error" in compare_plots.scaling_fit([(1e5, 0.5), (2e5, 0.6)])


def test_cli_writes_table_csv_markdown_plots_and_fit(group_tree, tmp_path, kellen_cmd):
    _, spec_dir, root = group_tree
    out = tmp_path / "report"
    proc = subprocess.run(kellen_cmd + ["compare", "exp95", "--spec-dir", str(spec_dir), "--from", str(root),
                                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "exp95_e" in proc.stdout and "scaling fit: final_exact_accuracy = 0.9500" in proc.stdout
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == list(SIZES)
    assert float(rows[0]["final_exact_accuracy"]) == pytest.approx(law(1e5))
    md = (out / "compare.md").read_text()
    assert md.count("\n| `exp95_") == 5 and "train−eval gap" in md
    data = json.loads((out / "compare.json").read_text())
    assert data["fit"]["c"] == pytest.approx(C, abs=1e-3)
    pngs = sorted(os.listdir(out / "plots"))
    assert pngs == ["by_arch.hidden_size.png", "curves_steps.png", "curves_wallclock.png", "pareto.png",
                    "scaling_fit.png"]
    import matplotlib.image as mpimg

    for p in pngs:  # real images with drawn content, not blank canvases
        img = mpimg.imread(out / "plots" / p)
        assert img.shape[0] > 200 and np.std(img[..., :3]) > 0.05, p


def test_missing_partial_and_unfinished_records_are_rows_not_crashes(group_tree, tmp_path):
    group, spec_dir, root = group_tree
    g = root / "exp95"
    import shutil

    shutil.rmtree(g / "exp95_a")  # never ran
    (g / "exp95_b" / "status.json").unlink()  # died before its first status
    (g / "exp95_c" / "summary.json").write_text('{"primary_set": "al')  # torn summary: rebuilt from the log
    write_record(str(g / "exp95_d"), 512, 6.4e6, 0.5, state="running", steps=50)
    write_record(str(g / "exp95_a--epochs=20"), 64, 1e5, 0.7)  # an override variant of the group
    (g / "_scratch").mkdir()  # bookkeeping dirs are not runs
    rows = {r["run"]: r for r in compare.write_report(group, str(root), str(tmp_path / "out"))["rows"]}
    assert list(rows) == list(SIZES) + ["exp95_a--epochs=20"]
    assert rows["exp95_a"]["state"] == "not_started" and "no run record" in rows["exp95_a"]["note"]
    assert rows["exp95_a"]["final_exact_accuracy"] is None
    assert "no status.json" in rows["exp95_b"]["note"] and rows["exp95_b"]["arch.hidden_size"] == 128
    assert rows["exp95_c"]["final_exact_accuracy"] == pytest.approx(law(1.6e6))
    assert "summary rebuilt" in rows["exp95_c"]["note"] and "summary.json: Unterminated" in rows["exp95_c"]["note"]
    assert "running: latest eval" in rows["exp95_d"]["note"]
    assert rows["exp95_a--epochs=20"]["arch.hidden_size"] == 64 and "override variant" in rows["exp95_a--epochs=20"]["note"]


def test_records_read_from_gcs(group_tree, gcs_prefix, tmp_path):
    from kellen import gcs

    group, _, root = group_tree
    url = gcs_prefix + "runs"
    gcs.upload_tree(str(root), url)
    local = compare.compare_rows(group, records.load_group_results(group, str(root)))
    remote = compare.compare_rows(group, records.load_group_results(group, url))
    assert remote == local


def test_guide_results_fills_section_and_log(group_tree, tmp_path):
    from kellen.experiments import guide

    group, spec_dir, root = group_tree
    out, log = tmp_path / "guides", tmp_path / "EXPERIMENT_LOG.md"
    args = ["exp95", "--spec-dir", str(spec_dir), "--out", str(out), "--from", str(root), "--log", str(log)]
    # The baseline (exp95_c, ~0.926) meets >= 0.9; exp95_a (~0.855) fails "for all".
    assert guide.main(args + ["--results"]) == 0
    text = (out / "exp95.md").read_text()
    section = text[text.index("## Results\n"):text.index("## Status")]
    assert "**Complete: 5 of 5 runs completed**" in section
    assert section.count("| `exp95_") == 5
    assert f"✅ eval/all/exact_accuracy >= 0.9 for baseline: `exp95_c` {law(1.6e6):.4f}" in section
    assert f"❌ eval/all/exact_accuracy >= 0.9 for all: `exp95_a` {law(1e5):.4f}" in section
    assert "[scaling_fit](results/exp95/plots/scaling_fit.png)" in section
    assert (out / "results" / "exp95" / "plots" / "scaling_fit.png").is_file()
    assert "scaling fit: final_exact_accuracy = 0.9500" in section and "last updated" in section
    entry = log.read_text()
    assert entry.count("<!-- entry: exp95 -->") == 1 and "`arch.hidden_size` ∈ {64, 128, 256, 512, 1024}" in entry
    assert "**Best run:** `exp95_e`" in entry and "(guides/results/exp95/plots/pareto.png)" in entry
    # A plain re-render keeps the filled Results; a second --results replaces the log entry in place.
    assert guide.main(["exp95", "--spec-dir", str(spec_dir), "--out", str(out), "--output-root", str(root)]) == 0
    assert section in (out / "exp95.md").read_text()
    assert guide.main(args + ["--results"]) == 0
    assert log.read_text().count("<!-- entry: exp95 -->") == 1


def test_unfinished_group_is_not_logged(group_tree, tmp_path, capsys):
    from kellen.experiments import guide

    group, spec_dir, root = group_tree
    write_record(str(root / "exp95" / "exp95_e"), 1024, 2.56e7, 0.3, state="running", steps=50)
    log = tmp_path / "LOG.md"
    assert guide.main(["exp95", "--spec-dir", str(spec_dir), "--out", str(tmp_path / "g"), "--from", str(root), "--log", str(log), "--results"]) == 0
    assert not log.exists() and "not logged" in capsys.readouterr().out
    text = (tmp_path / "g" / "exp95.md").read_text()
    assert "**Running: 4 of 5 runs completed**" in text


@pytest.mark.parametrize("argv, needle", [
    (["compare", "exp404"], "exp404"),  # unknown group
    (["compare", "exp95", "--from", "/nonexistent-dir-xyz"], None),  # no records: rows of not_started
])
def test_bad_input(group_tree, tmp_path, kellen_cmd, argv, needle):
    _, spec_dir, _ = group_tree
    proc = subprocess.run(kellen_cmd + argv + ["--spec-dir", str(spec_dir), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    if needle:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
        assert not (tmp_path / "o").exists()
    else:
        assert proc.returncode == 0 and proc.stdout.count("not_started") == 5


def test_unwritable_report_dir(group_tree, tmp_path, kellen_cmd):
    _, spec_dir, root = group_tree
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    proc = subprocess.run(kellen_cmd + ["compare", "exp95", "--spec-dir", str(spec_dir), "--from", str(root),
                                        "--out", str(blocker / "sub")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "kellen compare: error:" in proc.stderr and blocker.read_text() == "keep me"


def test_gcs_source_without_credentials_says_how_to_log_in(group_tree, tmp_path, kellen_cmd):
    _, spec_dir, _ = group_tree
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "no-such-key.json")
    proc = subprocess.run(kellen_cmd + ["compare", "exp95", "--spec-dir", str(spec_dir), "--from", "gs://kellen-private/runs",
                                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "gcloud auth application-default login" in proc.stderr and "gs://kellen-private" in proc.stderr
