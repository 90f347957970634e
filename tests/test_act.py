"""ACT wrapper semantics (kellen.model.act) against the reference TinyRecursiveReasoningModel_ACTV1.

Tiny configs (float32 unless a test says otherwise; the gradient test runs in float64).
Expected values are derived independently in the tests (numpy, or a hand-written JAX
forward pass built from kellen.model.trm.reasoning_module).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kellen.model.act import Carry, act_step, initial_carry, refresh_carry
from kellen.model.config import ConfigError, TRMConfig
from kellen.model.losses import act_loss_head
from kellen.model.trm import inner_forward, reasoning_module, weight_shapes
from kellen.model.layers import rope_tables


def make_cfg(**kw):
    base = dict(seq_len=6, vocab_size=5, num_puzzle_identifiers=4, H_cycles=2, L_cycles=2, L_layers=1,
                hidden_size=16, num_heads=2, expansion=2.0, puzzle_emb_len=1, forward_dtype="float32",
                halt_max_steps=4, halt_exploration_prob=0.0)
    base.update(kw)
    cfg = TRMConfig(**base)
    cfg.validate()
    return cfg


def make_batch(cfg, b, seed):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, cfg.seq_len)), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, cfg.seq_len)), jnp.int32),
            "puzzle_identifiers": jnp.asarray(rng.integers(0, cfg.num_puzzle_identifiers, (b,)), jnp.int32)}


def make_weights(cfg, seed=0, q_kernel_std=0.0, q_bias=(0.0, -5.0), dtype=None):
    """Random weights with init_weights' structure (weight_shapes), drawn in numpy: no compile cost."""
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(cfg)

    def draw(path, sd):
        name = jax.tree_util.keystr(path)
        if "z_init" in name:
            std = 1.0
        elif "puzzle_emb" in name:
            std = 0.5
        elif "q_head" in name and "kernel" in name:
            std = q_kernel_std
        elif "q_head" in name:
            return jnp.asarray(q_bias, dtype or sd.dtype)
        else:
            std = 1.0 / math.sqrt(sd.shape[-2] if "blocks" in name or "lm_head" in name else sd.shape[-1])
        return jnp.asarray(std * rng.standard_normal(sd.shape), dtype or sd.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# Tiny models: XLA's backend optimisation only costs compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def jitted_step(cfg, training, with_grads=False):
    return jit(lambda w, c, b, r: act_step(cfg, w, c, b, training=training, rng=r, with_grads=with_grads))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_bce(x, y):
    x = np.asarray(x, np.float64)
    return -(y * np.log(np_sigmoid(x)) + (1 - y) * np.log(1 - np_sigmoid(x)))


# ---- carry -----------------------------------------------------------------------------------------
def test_initial_carry_then_first_step_takes_whole_batch():
    cfg = make_cfg()
    batch = make_batch(cfg, 4, 0)
    w = make_weights(cfg)
    carry = initial_carry(cfg, batch)
    assert np.all(np.asarray(carry.halted))
    assert np.all(np.asarray(carry.steps) == 0)
    assert carry.z_H.shape == (4, cfg.seq_len + 1, cfg.hidden_size)
    res = jitted_step(cfg, False)(w, carry, batch, None)
    new = res["carry"]
    for k in batch:
        np.testing.assert_array_equal(np.asarray(new.data[k]), np.asarray(batch[k]))
    np.testing.assert_array_equal(np.asarray(new.steps), [1, 1, 1, 1])
    assert not np.any(np.asarray(new.halted))  # halt_max_steps=4, eval
    assert res["outputs"]["logits"].shape == (4, cfg.seq_len, cfg.vocab_size)


def test_refresh_carry_resets_only_halted_rows():
    cfg = make_cfg()
    w = make_weights(cfg)
    b, t, d = 4, cfg.total_len, cfg.hidden_size
    rng = np.random.default_rng(1)
    old_zH = rng.standard_normal((b, t, d)).astype(np.float32)
    old_zL = rng.standard_normal((b, t, d)).astype(np.float32)
    old_data = make_batch(cfg, b, 11)
    new_batch = make_batch(cfg, b, 12)
    halted = np.array([True, False, True, False])
    steps = np.array([2, 5, 1, 3], np.int32)
    carry = Carry(jnp.asarray(old_zH), jnp.asarray(old_zL), jnp.asarray(steps), jnp.asarray(halted), old_data)
    out = refresh_carry(w, carry, new_batch)
    zH, zL = np.asarray(out.z_H), np.asarray(out.z_L)
    zi_H, zi_L = np.asarray(w["z_init"]["H"]), np.asarray(w["z_init"]["L"])
    for i in range(b):
        if halted[i]:
            np.testing.assert_array_equal(zH[i], np.broadcast_to(zi_H, (t, d)))
            np.testing.assert_array_equal(zL[i], np.broadcast_to(zi_L, (t, d)))
            assert int(out.steps[i]) == 0
            for k in new_batch:
                np.testing.assert_array_equal(np.asarray(out.data[k][i]), np.asarray(new_batch[k][i]))
        else:
            np.testing.assert_array_equal(zH[i], old_zH[i])
            np.testing.assert_array_equal(zL[i], old_zL[i])
            assert int(out.steps[i]) == steps[i]
            for k in new_batch:
                np.testing.assert_array_equal(np.asarray(out.data[k][i]), np.asarray(old_data[k][i]))
    # the fixtures really differ, so the checks above distinguish the two cases
    assert not np.array_equal(np.asarray(old_data["inputs"]), np.asarray(new_batch["inputs"]))


# ---- halting ---------------------------------------------------------------------------------------
def test_eval_never_halts_before_max_steps():
    cfg = make_cfg()
    assert cfg.halt_max_steps == 4
    batch = make_batch(cfg, 4, 2)
    w = make_weights(cfg, q_bias=[5.0, -5.0])  # q_halt > 0: would halt at once when training
    carry = initial_carry(cfg, batch)
    step = jitted_step(cfg, False)
    for s in range(1, cfg.halt_max_steps + 1):
        res = step(w, carry, batch, None)
        carry = res["carry"]
        np.testing.assert_array_equal(np.asarray(carry.steps), [s] * 4)
        assert float(np.min(np.asarray(res["outputs"]["q_halt_logits"]))) > 0
        if s < cfg.halt_max_steps:
            assert not np.any(np.asarray(carry.halted)), s
        else:
            assert np.all(np.asarray(carry.halted))
        # halted rows are the only ones counted
        assert int(res["metrics"]["count"]) == (4 if s == cfg.halt_max_steps else 0)


def _first_halt_steps(cfg, w, batch, n_steps, seed):
    carry = initial_carry(cfg, batch)
    step = jitted_step(cfg, True)
    first = np.zeros(batch["inputs"].shape[0], np.int64)
    for s in range(1, n_steps + 1):
        res = step(w, carry, batch, jax.random.fold_in(jax.random.PRNGKey(seed), s))
        carry = res["carry"]
        h = np.asarray(carry.halted)
        first = np.where((first == 0) & h, s, first)
        if s == 1:
            np.testing.assert_array_equal(np.asarray(carry.steps), 1)
    return first


def test_training_halts_on_positive_q_halt():
    cfg = make_cfg()
    batch = make_batch(cfg, 8, 3)
    w = make_weights(cfg, q_bias=[5.0, -5.0])
    res = jitted_step(cfg, True)(w, initial_carry(cfg, batch), batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(res["outputs"]["q_halt_logits"]), 5.0, rtol=1e-6)
    assert np.all(np.asarray(res["carry"].halted))
    assert int(res["metrics"]["count"]) == 8 and int(res["metrics"]["steps"]) == 8


def test_training_no_halt_on_negative_q_halt_until_max():
    cfg = make_cfg(no_ACT_continue=True)
    assert cfg.halt_max_steps == 4
    batch = make_batch(cfg, 8, 4)
    w = make_weights(cfg, q_bias=[-5.0, 5.0])
    first = _first_halt_steps(cfg, w, batch, 4, seed=1)
    np.testing.assert_array_equal(first, [4] * 8)


def test_exploration_delays_halting():
    cfg = make_cfg(halt_exploration_prob=1.0)
    assert cfg.halt_max_steps == 4
    b = 256
    batch = make_batch(cfg, b, 5)
    w = make_weights(cfg, q_bias=[5.0, -5.0])
    first = _first_halt_steps(cfg, w, batch, 4, seed=2)
    assert first.min() >= 2  # nobody halts at step 1: min_halt_steps >= 2 for every row
    assert set(first.tolist()) == {2, 3, 4}
    # min_halt_steps ~ U{2,3,4} drawn afresh each step (as in the reference):
    # P(first=2)=1/3, P(3)=2/3*2/3=4/9, P(4)=2/9.
    freq = np.array([(first == s).mean() for s in (2, 3, 4)])
    np.testing.assert_allclose(freq, [1 / 3, 4 / 9, 2 / 9], atol=0.1)


def test_hrm_q_continue_target_and_halting():
    cfg = make_cfg(no_ACT_continue=False)
    b = 8
    batch = make_batch(cfg, b, 6)
    w = make_weights(cfg, q_kernel_std=1.0, q_bias=[0.0, 0.0])
    step = jitted_step(cfg, True)
    next_q = jit(lambda p, zh, zl, x, r: inner_forward(cfg, p, zh, zl, x, r)[3:])
    carry = initial_carry(cfg, batch)
    saw_last, saw_not_last = False, False
    for s in range(1, cfg.halt_max_steps + 1):
        res = step(w, carry, batch, jax.random.PRNGKey(s))
        new, out, metrics = res["carry"], res["outputs"], res["metrics"]
        assert "target_q_continue" in out
        qh, qc = np.asarray(out["q_halt_logits"]), np.asarray(out["q_continue_logits"])
        steps = np.asarray(new.steps)
        is_last = steps >= cfg.halt_max_steps
        # halting: q_halt > q_continue (or last step); exploration is off
        np.testing.assert_array_equal(np.asarray(new.halted), is_last | (qh > qc))
        # bootstrapped target from one more forward on the new state
        rows = w["puzzle_emb"][new.data["puzzle_identifiers"]]
        nqh, nqc = next_q(w["params"], new.z_H, new.z_L, new.data["inputs"], rows)
        nqh, nqc = np.asarray(nqh, np.float64), np.asarray(nqc, np.float64)
        expected = np_sigmoid(np.where(is_last, nqh, np.maximum(nqh, nqc)))
        np.testing.assert_allclose(np.asarray(out["target_q_continue"]), expected, rtol=1e-5, atol=1e-6)
        # the two branches give different targets on these rows (so the check above is selective)
        assert np.any(np.abs(np_sigmoid(nqh) - np_sigmoid(np.maximum(nqh, nqc))) > 1e-3)
        saw_last |= bool(is_last.any())
        saw_not_last |= bool((~is_last).any())
        if s == 1:
            assert 0 < (qh > qc).sum() < b, "fixture should give a mix of halting rows"
        # loss = lm + 0.5*q_halt + 0.5*q_continue; q_continue_loss = BCE(q_cont, target)
        qcl = np_bce(qc, np.asarray(out["target_q_continue"], np.float64)).sum()
        np.testing.assert_allclose(float(metrics["q_continue_loss"]), qcl, rtol=1e-5)
        np.testing.assert_allclose(float(res["loss"]), float(metrics["lm_loss"]) + 0.5 * float(
            metrics["q_halt_loss"]) + 0.5 * qcl, rtol=1e-5)
        assert qcl > 0.1
        carry = new
    assert saw_last and saw_not_last


def test_hrm_vs_trm_halting_rule():
    batch = make_batch(make_cfg(), 8, 7)
    key = jax.random.PRNGKey(0)
    # q_halt=-1 < 0 but > q_continue=-3: HRM halts, TRM does not
    for no_cont, expect in ((False, True), (True, False)):
        cfg = make_cfg(no_ACT_continue=no_cont)
        res = jitted_step(cfg, True)(make_weights(cfg, q_bias=[-1.0, -3.0]), initial_carry(cfg, batch), batch, key)
        assert np.all(np.asarray(res["carry"].halted) == expect)
        assert ("target_q_continue" in res["outputs"]) == (not no_cont)
        assert ("q_continue_loss" in res["metrics"]) == (not no_cont)
    # q_halt=1 > 0 but < q_continue=3: TRM halts, HRM does not
    for no_cont, expect in ((False, False), (True, True)):
        cfg = make_cfg(no_ACT_continue=no_cont)
        res = jitted_step(cfg, True)(make_weights(cfg, q_bias=[1.0, 3.0]), initial_carry(cfg, batch), batch, key)
        assert np.all(np.asarray(res["carry"].halted) == expect)


# ---- gradients -------------------------------------------------------------------------------------
def _hand_loss(cfg, params, rows, z_init, batch, stop):
    """TRM forward written out with Python loops; the first H_cycles-1 cycles optionally cut."""
    sg = jax.lax.stop_gradient
    b = batch["inputs"].shape[0]
    tok = params["embed_tokens"][batch["inputs"]]
    emb = math.sqrt(cfg.hidden_size) * jnp.concatenate([rows.reshape(b, 1, cfg.hidden_size), tok], axis=1)
    rope = rope_tables(cfg.total_len, cfg.head_dim, cfg.rope_theta)
    shape = (b, cfg.total_len, cfg.hidden_size)
    z_H, z_L = jnp.broadcast_to(z_init["H"], shape), jnp.broadcast_to(z_init["L"], shape)
    blocks = params["blocks"]
    blocks0, emb0 = (sg(blocks), sg(emb)) if stop else (blocks, emb)
    for _ in range(cfg.H_cycles - 1):
        for _ in range(cfg.L_cycles):
            z_L = reasoning_module(cfg, blocks0, z_L, z_H + emb0, rope)
        z_H = reasoning_module(cfg, blocks0, z_H, z_L, rope)
    if stop:
        z_H, z_L = sg(z_H), sg(z_L)
    for _ in range(cfg.L_cycles):
        z_L = reasoning_module(cfg, blocks, z_L, z_H + emb, rope)
    z_H = reasoning_module(cfg, blocks, z_H, z_L, rope)
    logits = (z_H @ params["lm_head"])[:, 1:]
    q = z_H[:, 0] @ params["q_head"]["kernel"] + params["q_head"]["bias"]
    steps = jnp.ones((b,), jnp.int32)
    outputs = {"logits": logits, "q_halt_logits": q[:, 0], "q_continue_logits": q[:, 1]}
    loss, _ = act_loss_head(cfg.loss_type, steps >= cfg.halt_max_steps, steps, batch["labels"], outputs)
    return loss


def _rel_diff(a, b):
    fa = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    fb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
    assert len(fa) == len(fb)
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(fa, fb)))
    den = math.sqrt(sum(float(np.sum(y ** 2)) for y in fb))
    return num / den


def test_gradient_flows_only_through_last_h_cycle():
    # float64 end to end, so truncated-backprop grads can be compared far below float32 noise
    with jax.enable_x64(True):
        cfg = make_cfg(H_cycles=3, L_cycles=1, L_layers=1, forward_dtype="float64")
        batch = make_batch(cfg, 4, 8)
        w = make_weights(cfg, q_kernel_std=0.5, dtype=jnp.float64)
        res = jitted_step(cfg, False, True)(w, initial_carry(cfg, batch), batch, None)
        g_kellen = {"params": res["grads"]["params"], "rows": res["grads"]["puzzle_rows"]}
        assert res["outputs"]["logits"].dtype == jnp.float64
        assert g_kellen["rows"].dtype == jnp.float64
        rows = w["puzzle_emb"][batch["puzzle_identifiers"]]

        def hand_grads(stop):
            f = jit(jax.value_and_grad(
                lambda p, r: _hand_loss(cfg, p, r, w["z_init"], batch, stop), argnums=(0, 1)))
            loss, (gp, gr) = f(w["params"], rows)
            return float(loss), {"params": gp, "rows": gr}

        loss_cut, g_cut = hand_grads(True)
        loss_full, g_full = hand_grads(False)
    np.testing.assert_allclose(float(res["loss"]), loss_cut, rtol=1e-10)
    np.testing.assert_allclose(loss_full, loss_cut, rtol=1e-10)  # same forward value
    # leaf by leaf: kellen's grads equal the truncated-backprop grads
    for a, b in zip(jax.tree_util.tree_leaves(g_kellen), jax.tree_util.tree_leaves(g_cut)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == np.float64
        assert np.max(np.abs(a - b)) <= 1e-6 * max(1e-3, np.max(np.abs(b))), np.max(np.abs(a - b))
    assert _rel_diff(g_kellen, g_cut) < 1e-6
    # and the test can tell truncated from full backprop
    assert _rel_diff(g_full, g_cut) > 1e-3
    assert _rel_diff(g_kellen, g_full) > 1e-3


# ---- compile size ----------------------------------------------------------------------------------
def _count_eqns(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns"):
                    n += _count_eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += _count_eqns(sub.jaxpr)
    return n


def _step_jaxpr(cfg):
    batch = make_batch(cfg, 2, 9)
    w = weight_shapes(cfg)
    carry = jax.eval_shape(lambda b: initial_carry(cfg, b), batch)
    fn = lambda w_, c_, b_, r_: act_step(cfg, w_, c_, b_, training=True, rng=r_, with_grads=True)
    return jax.make_jaxpr(fn)(w, carry, batch, jax.random.PRNGKey(0))


def test_jaxpr_size_independent_of_cycle_counts():
    small = _step_jaxpr(make_cfg(H_cycles=2, L_cycles=2))
    big = _step_jaxpr(make_cfg(H_cycles=6, L_cycles=8))
    n_small, n_big = _count_eqns(small.jaxpr), _count_eqns(big.jaxpr)
    # the counter really descends into loop bodies (the top level alone is much smaller)
    assert n_small > len(small.jaxpr.eqns) + 50
    assert n_small == n_big, (n_small, n_big)
    assert len(str(small)) / len(str(big)) == pytest.approx(1.0, abs=0.05)


# ---- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("changes,key", [
    (dict(hidden_size=16, num_heads=3), "num_heads"),
    (dict(pos_encodings="abs"), "pos_encodings"),
    (dict(puzzle_emb_ndim=0, puzzle_emb_len=16), "puzzle_emb_len"),
    (dict(forward_dtype="int8"), "forward_dtype"),
])
def test_config_validation_names_key(changes, key):
    cfg = TRMConfig(hidden_size=16, num_heads=2, seq_len=4).replace(**changes)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert key in str(e.value)
    if key == "num_heads":
        assert "hidden_size" in str(e.value)
    with pytest.raises(ConfigError):
        TRMConfig.from_dict(dict(dict(hidden_size=16, num_heads=2, seq_len=4), **changes))


def test_config_from_dict_unknown_key():
    with pytest.raises(ConfigError) as e:
        TRMConfig.from_dict({"hidden_size": 16, "num_heads": 2, "hiden_layers": 3})
    assert "hiden_layers" in str(e.value)
    # the ignored reference keys are accepted
    cfg = TRMConfig.from_dict({"hidden_size": 16, "num_heads": 2, "name": "trm", "loss": {}, "batch_size": 8})
    assert cfg.hidden_size == 16


# ---- variants --------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [
    dict(mlp_t=True),
    dict(pos_encodings="learned"),
    dict(puzzle_emb_ndim=0, puzzle_emb_len=0),
], ids=["mlp_t", "learned_pos", "no_puzzle_emb"])
def test_variants_train_step(changes):
    cfg = make_cfg(L_cycles=1, **changes)
    b = 3
    batch = make_batch(cfg, b, 10)
    w = make_weights(cfg, q_kernel_std=0.3)
    if cfg.puzzle_dim == 0:
        assert "puzzle_emb" not in w and cfg.total_len == cfg.seq_len
    if cfg.pos_encodings == "learned":
        assert w["params"]["embed_pos"].shape == (cfg.total_len, cfg.hidden_size)
    res = jitted_step(cfg, True, True)(w, initial_carry(cfg, batch), batch, jax.random.PRNGKey(3))
    assert res["outputs"]["logits"].shape == (b, cfg.seq_len, cfg.vocab_size)
    assert np.isfinite(float(res["loss"])) and float(res["loss"]) > 0
    leaves = jax.tree_util.tree_leaves(res["grads"]["params"])
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    # the variant-specific weights receive gradient
    blocks = res["grads"]["params"]["blocks"]
    if cfg.mlp_t:
        assert "attn_qkv" not in blocks and float(jnp.abs(blocks["mlp_t_gate_up"]).sum()) > 0
    if cfg.pos_encodings == "learned":
        assert float(jnp.abs(res["grads"]["params"]["embed_pos"]).sum()) > 0
    if cfg.puzzle_dim == 0:
        assert res["grads"]["puzzle_rows"] is None
    else:
        g_rows = np.asarray(res["grads"]["puzzle_rows"])
        assert g_rows.shape == (b, cfg.puzzle_dim) and np.all(np.isfinite(g_rows))


def test_bfloat16_forward():
    cfg = make_cfg(forward_dtype="bfloat16")
    batch = make_batch(cfg, 3, 11)
    w = make_weights(cfg, q_kernel_std=0.3)
    assert w["z_init"]["H"].dtype == jnp.bfloat16
    res = jitted_step(cfg, True)(w, initial_carry(cfg, batch), batch, jax.random.PRNGKey(4))
    out = res["outputs"]
    assert out["logits"].dtype == jnp.bfloat16
    assert out["q_halt_logits"].dtype == jnp.float32
    assert out["q_continue_logits"].dtype == jnp.float32
    assert res["carry"].z_H.dtype == jnp.bfloat16
    assert np.isfinite(float(res["loss"])) and float(res["loss"]) > 0
    assert np.all(np.isfinite(np.asarray(out["logits"], np.float32)))
