"""Checkpointer on its own: restore onto another device count, and gs:// through the emulator."""
import jax
import jax.numpy as jnp
import numpy as np

from kellen.train import checkpoint as ck
from kellen.train.loop import Trainer
from kellen.train.run_record import RunRecord
from test_sharded_step import tiny_config, tiny_dataset


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_restore_8_devices_onto_4(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    eight = Trainer(tiny_config(root, {"data": 4, "fsdp": 2}), RunRecord(str(tmp_path / "r8"), False),
                    devices=jax.devices())
    state = eight.init_state()
    key = jax.random.key_data(jax.random.PRNGKey(3))
    saver = ck.Checkpointer(str(tmp_path / "ckpt"), every_steps=None, keep=2)
    saver.save(5, state, key, {"step": 5}, force=True)
    saver.wait()
    saver.close()

    four = Trainer(tiny_config(root, {"data": 2, "fsdp": 2}), RunRecord(str(tmp_path / "r4"), False),
                   devices=jax.devices()[:4])
    target = ck.abstract_like(jax.eval_shape(four.init_state), four.state_sharding)
    rng_target = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(
        four.mesh, jax.sharding.PartitionSpec()))
    restored, rng, meta = ck.Checkpointer(str(tmp_path / "ckpt"), None, 2).restore(5, target, rng_target)
    assert meta == {"step": 5} and np.array_equal(rng, key)
    for leaf in jax.tree_util.tree_leaves(restored):
        assert len(leaf.sharding.device_set) == 4
    a, b = leaves(jax.device_get(state)), leaves(jax.device_get(restored))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_gcs_save_and_restore_twenty_times_in_a_row(gcs_prefix):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    directory = gcs_prefix + "ckpt"
    saver = ck.Checkpointer(directory, every_steps=1, keep=3)
    for step in range(1, 21):
        state = {"w": jax.device_put(jnp.arange(16.0) * step, sharded), "step": jnp.asarray(step)}
        saver.save(step, state, jnp.zeros(2, jnp.uint32), {"step": step})
        saver.wait()
        target = {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=sharded),
                  "step": jax.ShapeDtypeStruct((), jnp.int32)}
        got, _, meta = saver.restore(saver.latest_step(), target, jax.ShapeDtypeStruct((2,), jnp.uint32))
        assert saver.latest_step() == step and meta == {"step": step}
        np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(16.0) * step)
    saver.close()
    from kellen import gcs
    kept = sorted({int(p.split("/")[0]) for p in gcs.list_files(directory) if p.split("/")[0].isdigit()})
    assert kept == [18, 19, 20]
