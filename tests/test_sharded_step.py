"""The sharded train step: 8 CPU devices with meshes (8,1) and (4,2) compute what one device does."""
import dataclasses

import jax
import numpy as np
import pytest

from kellen.data import format as fmt
from kellen.model.config import ConfigError
from kellen.train import mesh as meshlib
from kellen.train.config import ArchConfig, MeshConfig, PretrainConfig
from kellen.train.loop import Trainer
from kellen.train.run_record import RunRecord


def tiny_dataset(root, n=64, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, 11, (n, 81)).astype(np.uint8)
    labels = rng.integers(1, 11, (n, 81)).astype(np.uint8)
    arrays = fmt.single_example_arrays(inputs, labels, 1)
    arrays["puzzle_identifiers"] = (np.arange(n) % 5).astype(np.int32)
    meta = dataclasses.replace(fmt.single_set_metadata(arrays, 11), num_puzzle_identifiers=5)
    for split in fmt.SPLITS:
        fmt.write_split(str(root / split), meta, {"all": arrays})
    return str(root)


def tiny_config(root, axes, **kw):
    arch = ArchConfig(hidden_size=32, num_heads=4, H_cycles=2, L_cycles=2, L_layers=1, halt_max_steps=3,
                      puzzle_emb_len=1, forward_dtype="float32")
    return PretrainConfig(arch=arch, data_paths=[root], global_batch_size=16, epochs=4, eval_interval=2,
                          lr=1e-3, lr_warmup_steps=2, puzzle_emb_lr=1e-2, ema=True,
                          mesh=MeshConfig(axes=axes, fsdp_min_size=64), compilation_cache_dir=None, **kw)


def run_steps(cfg, tmp_path, devices, steps=3):
    """Losses of `steps` steps; the state and eval metrics after the first one."""
    trainer = Trainer(cfg, RunRecord(str(tmp_path / "rec"), writer=False), devices=devices)
    state = trainer.init_state()
    losses, first = [], None
    for step in range(steps):
        batch = trainer.global_batch(trainer.sampler.batch(step))
        state, loss, metrics = trainer.train_step(state, batch, jax.random.fold_in(jax.random.PRNGKey(0), step))
        losses.append(float(loss))
        if step == 0:
            first = (jax.device_get(state), trainer.evaluate(state))
    return trainer, losses, *first


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    root = tiny_dataset(tmp / "ds")
    return root, run_steps(tiny_config(root, {"data": 1, "fsdp": 1}), tmp, jax.devices()[:1])[1:]


@pytest.mark.parametrize("axes", [{"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}])
def test_sharded_step_equals_single_device(tmp_path, axes, single_device_run):
    assert jax.device_count() == 8
    root, (ref_losses, ref_state, ref_eval) = single_device_run
    trainer, losses, state, ev = run_steps(tiny_config(root, axes), tmp_path, jax.devices())
    if axes["fsdp"] > 1:  # the rule really shards something
        specs = jax.tree_util.tree_leaves(trainer.state_sharding["weights"], is_leaf=lambda x: hasattr(x, "spec"))
        assert any("fsdp" in str(s.spec) for s in specs)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)  # three steps, carry persisting
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_state)
    flat = dict(jax.tree_util.tree_leaves_with_path(state))
    for path, ref in flat_ref:
        got = flat[path]
        if np.issubdtype(np.asarray(ref).dtype, np.floating):
            scale = max(float(np.max(np.abs(ref))), 1e-6)
            assert float(np.max(np.abs(np.asarray(got) - ref))) <= 1e-6 * scale, jax.tree_util.keystr(path)
        else:
            assert np.array_equal(got, ref), jax.tree_util.keystr(path)
    for k, v in ref_eval.items():
        assert abs(ev[k] - v) <= 1e-6 * max(1.0, abs(v)), k


def test_mesh_shapes_that_cannot_work_are_named():
    with pytest.raises(ConfigError, match=r"mesh.axes: shape \(3, 2\) needs 6 devices, but there are 8"):
        meshlib.resolve_axes({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ConfigError, match="fixed axes 3 do not divide the 8 devices"):
        meshlib.resolve_axes({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        meshlib.resolve_axes({"data": -1, "fsdp": -1}, 8)
    assert meshlib.resolve_axes({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2}
    mesh = meshlib.make_mesh({"data": -1, "fsdp": 2})
    with pytest.raises(ConfigError, match="global_batch_size=12 does not divide over the data axes"):
        meshlib.check_batch(mesh, ["data", "fsdp"], 12)
    with pytest.raises(ConfigError, match="'model' is not an axis"):
        meshlib.check_batch(mesh, ["model"], 16)


def test_parameter_rule_shards_only_large_arrays_along_a_divisible_dim():
    mesh = meshlib.make_mesh({"data": 4, "fsdp": 2})
    P = jax.sharding.PartitionSpec
    assert meshlib.param_spec((512, 2048), mesh, "fsdp", 1 << 10) == P(None, "fsdp")
    assert meshlib.param_spec((7, 1024), mesh, "fsdp", 1 << 10) == P(None, "fsdp")
    assert meshlib.param_spec((7, 9), mesh, "fsdp", 1) == P()
    assert meshlib.param_spec((512, 2048), mesh, "fsdp", 1 << 30) == P()
