"""Fidelity to the PyTorch reference: replay its fixtures through the real CLI."""
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kellen.interop.parity import run_parity, write_fixture
from kellen.model.config import TRMConfig
from kellen.model.trm import init_weights


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_reference_fixtures_pass_through_cli(kellen_cmd, fixture_paths):
    assert [p.name for p in fixture_paths] == ["trm_attn_rope.npz", "trm_mlp_t.npz"]
    proc = _run(kellen_cmd + ["parity"] + [str(p) for p in fixture_paths])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("\nPASS") == 2, proc.stdout
    # Every recorded gradient tensor was compared, including the puzzle rows.
    for path in fixture_paths:
        grads = {k.split("/grad/")[1] for k in np.load(path).files if "/grad/" in k}
        for name in grads:
            assert "grad/" + name.replace("model.inner.", "") in proc.stdout, name
    for q in ("logits", "q_halt_logits", "z_H", "halted (mismatches)", "metric/exact_accuracy"):
        assert q in proc.stdout


def _perturbed(src, dst, name, scale):
    data = dict(np.load(src))
    data[name] = data[name] * scale
    np.savez(dst, **data)


def test_parity_fails_when_weights_differ(kellen_cmd, fixture_paths, tmp_path):
    bad = tmp_path / "bad.npz"
    _perturbed(fixture_paths[0], bad, "param/model.inner.lm_head.weight", 1.001)
    proc = _run(kellen_cmd + ["parity", str(bad)])
    assert proc.returncode == 1, proc.stdout
    logits_row = next(line for line in proc.stdout.splitlines() if line.startswith("logits "))
    assert logits_row.endswith("FAIL")


@pytest.mark.parametrize("case,expect", [
    ("missing", "missing tensor 'model.inner.L_level.layers.1.mlp.down_proj.weight' (expected shape (64, 256))"),
    ("shape", "tensor 'model.inner.q_head.weight' has shape (2, 63), but the config needs (2, 64)"),
    ("extra", "unexpected tensor 'model.inner.L_level.layers.7.mlp.down_proj.weight'"),
])
def test_bad_fixture_names_the_tensor(kellen_cmd, fixture_paths, tmp_path, case, expect):
    data = dict(np.load(fixture_paths[0]))
    if case == "missing":
        del data["param/model.inner.L_level.layers.1.mlp.down_proj.weight"]
    elif case == "shape":
        data["param/model.inner.q_head.weight"] = data["param/model.inner.q_head.weight"][:, :63]
    else:
        data["param/model.inner.L_level.layers.7.mlp.down_proj.weight"] = np.zeros((64, 256), np.float32)
    path = tmp_path / f"{case}.npz"
    np.savez(path, **data)
    proc = _run(kellen_cmd + ["parity", str(path)])
    assert proc.returncode == 2
    assert expect in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


CONFIGS = {
    "learned_no_H_repeat": dict(pos_encodings="learned", H_cycles=1, L_cycles=3, L_layers=3,
                                puzzle_emb_ndim=40, puzzle_emb_len=0),
    "no_pos_no_puzzle": dict(pos_encodings="none", H_cycles=3, L_cycles=1, L_layers=1,
                             puzzle_emb_ndim=0, puzzle_emb_len=0),
    "mlp_t_rope_wide": dict(mlp_t=True, pos_encodings="rope", H_cycles=2, L_cycles=2, L_layers=2,
                            hidden_size=48, puzzle_emb_len=3, expansion=2.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_handles_any_fixture_of_the_format(tmp_path, name):
    """Fixtures of other sizes/encodings/cycles, written by our model, replay exactly."""
    base = dict(seq_len=10, vocab_size=7, num_puzzle_identifiers=5, hidden_size=32, num_heads=2,
                halt_max_steps=3, halt_exploration_prob=0.0, forward_dtype="float32")
    cfg = TRMConfig(**{**base, **CONFIGS[name]})
    w = init_weights(cfg, jax.random.PRNGKey(1))
    if "puzzle_emb" in w:
        w["puzzle_emb"] = jax.random.normal(jax.random.PRNGKey(2), w["puzzle_emb"].shape) * 0.5
    w["params"]["q_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), (cfg.hidden_size, 2)) * 0.05
    w["params"]["q_head"]["bias"] = jnp.zeros((2,))
    rs = np.random.RandomState(0)
    batches = [{"inputs": rs.randint(0, 7, (6, 10)).astype(np.int32),
                "labels": rs.randint(0, 7, (6, 10)).astype(np.int32),
                "puzzle_identifiers": rs.randint(0, 5, (6,)).astype(np.int32)} for _ in range(4)]
    path = tmp_path / f"{name}.npz"
    write_fixture(str(path), cfg, w, batches)
    meta = json.loads(str(np.load(path)["meta_json"]))
    assert meta["arch"]["pos_encodings"] == cfg.pos_encodings
    report = run_parity(str(path))
    assert not report.failures, report.format()
    # Halting really varied across rows, so the carry-reset path ran.
    halted = np.stack([np.load(path)[f"train/step{t}/halted"] for t in range(4)])
    assert halted.any() and not halted.all()
