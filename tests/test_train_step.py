"""The training step ties model, optimizer, sign-SGD puzzle table and EMA together."""
import jax
import jax.numpy as jnp
import numpy as np

from kellen.model.config import TRMConfig
from kellen.train.step import OptimConfig, init_train_state, make_train_step


def test_train_step_learns_and_updates_each_part():
    cfg = TRMConfig(seq_len=6, vocab_size=5, num_puzzle_identifiers=10, hidden_size=32, num_heads=2,
                    H_cycles=2, L_cycles=1, L_layers=1, puzzle_emb_len=1, halt_max_steps=2,
                    forward_dtype="float32")
    opt = OptimConfig(lr=1e-2, lr_warmup_steps=2, weight_decay=0.0, puzzle_emb_lr=1e-2,
                      puzzle_emb_weight_decay=0.0, ema=True, ema_rate=0.9)
    inputs = jnp.asarray(np.random.RandomState(0).randint(1, 5, (16, 6)), jnp.int32)
    batch = {"inputs": inputs, "labels": inputs, "puzzle_identifiers": jnp.full((16,), 3, jnp.int32)}
    state = init_train_state(cfg, opt, 40, jax.random.PRNGKey(0), batch)
    table0 = np.asarray(state["weights"]["puzzle_emb"])
    step = jax.jit(make_train_step(cfg, opt, 40, global_batch_size=16))
    losses = []
    for i in range(40):
        state, loss, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["lm_loss"]) / 16)
    assert int(state["step"]) == 40
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses  # lm loss, not the q-head term
    table = np.asarray(state["weights"]["puzzle_emb"])
    # Only the batch's puzzle row moved, by sign-SGD steps of at most lr each.
    assert np.array_equal(np.delete(table, 3, axis=0), np.delete(table0, 3, axis=0))
    assert np.abs(table[3] - table0[3]).max() > 0
    assert np.abs(table[3] - table0[3]).max() <= 40 * opt.puzzle_emb_lr + 1e-6
    # EMA trails the params but is not equal to them.
    p, e = state["weights"]["params"]["lm_head"], state["ema"]["lm_head"]
    assert 0 < float(jnp.abs(p - e).max()) < float(jnp.abs(p).max())
