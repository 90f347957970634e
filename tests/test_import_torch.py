"""`kellen import-torch`: reference state_dict -> our weights on disk -> eval reproduces the reference."""
import subprocess
import zipfile

import jax.numpy as jnp
import numpy as np

from kellen.interop.import_torch import load_weights
from kellen.model.act import act_step, initial_carry

ARCH = ["--arch", "num_heads=4", "--arch", "H_cycles=2", "--arch", "L_cycles=2",
        "--arch", "halt_max_steps=4", "--arch", "forward_dtype=float32"]


def _state_dict_npz(fixture, path, prefix="_orig_mod.model.inner."):
    data = np.load(fixture)
    state = {prefix + k[len("param/model.inner."):]: data[k] for k in data.files if k.startswith("param/")}
    np.savez(path, **state)
    return data


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_import_compiled_state_dict_then_eval_matches_reference(kellen_cmd, fixture_paths, tmp_path):
    fixture = fixture_paths[0]  # attention + RoPE
    fx = _state_dict_npz(fixture, tmp_path / "step_100.npz")
    out = tmp_path / "imported"
    proc = _run(kellen_cmd + ["import-torch", str(tmp_path / "step_100.npz"), str(out)] + ARCH)
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size=64" in proc.stdout and "seq_len=81" in proc.stdout

    cfg, weights = load_weights(str(out))
    assert (cfg.hidden_size, cfg.L_layers, cfg.mlp_t, cfg.vocab_size) == (64, 2, False, 11)
    weights = {k: v for k, v in weights.items()}
    batch = {k: jnp.asarray(fx[f"batch0/{k}"]) for k in ("inputs", "labels", "puzzle_identifiers")}
    res = act_step(cfg, weights, initial_carry(cfg, batch), batch, training=False)
    ref = fx["eval/step0/logits"]
    err = np.max(np.abs(np.asarray(res["outputs"]["logits"]) - ref)) / np.max(np.abs(ref))
    assert err < 1e-5


def test_import_infers_mlp_t_sizes(kellen_cmd, fixture_paths, tmp_path):
    _state_dict_npz(fixture_paths[1], tmp_path / "sd.npz", prefix="model.inner.")
    out = tmp_path / "imported"
    proc = _run(kellen_cmd + ["import-torch", str(tmp_path / "sd.npz"), str(out)] + ARCH)
    assert proc.returncode == 0, proc.stderr
    cfg, _ = load_weights(str(out))
    assert cfg.mlp_t and cfg.seq_len == 81 and cfg.prefix_len == 16 and cfg.num_puzzle_identifiers == 3


def test_import_refuses_to_overwrite(kellen_cmd, fixture_paths, tmp_path):
    _state_dict_npz(fixture_paths[0], tmp_path / "sd.npz")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = _run(kellen_cmd + ["import-torch", str(tmp_path / "sd.npz"), str(out)] + ARCH)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_import_bad_shapes_name_tensor_and_leave_nothing(kellen_cmd, fixture_paths, tmp_path):
    _state_dict_npz(fixture_paths[0], tmp_path / "sd.npz")
    out = tmp_path / "imported"
    # num_heads does not change shapes, but expansion does: the MLP no longer fits.
    proc = _run(kellen_cmd + ["import-torch", str(tmp_path / "sd.npz"), str(out)] + ARCH + ["--arch", "expansion=8"])
    assert proc.returncode == 2
    assert "tensor '_orig_mod.model.inner.L_level.layers.0.mlp.gate_up_proj.weight' has shape (512, 64), " \
           "but the config needs (1024, 64)" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".import-*"))


def test_torch_archive_without_torch_says_how_to_fix(kellen_cmd, tmp_path):
    ckpt = tmp_path / "step_5"  # the reference saves with no extension
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("archive/data.pkl", b"")
    proc = _run(kellen_cmd + ["import-torch", str(ckpt), str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "pip install 'kellen[torch]'" in proc.stderr


def test_bad_arch_override_names_key(kellen_cmd, fixture_paths, tmp_path):
    _state_dict_npz(fixture_paths[0], tmp_path / "sd.npz")
    proc = _run(kellen_cmd + ["import-torch", str(tmp_path / "sd.npz"), str(tmp_path / "o"), "--arch", "pos_encoding=rope"])
    assert proc.returncode == 2 and "unknown arch key 'pos_encoding'" in proc.stderr
