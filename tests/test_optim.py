"""Optimizer, LR schedule, puzzle-embedding sign-SGD and EMA against hand-computed values.

Expected numbers come from the reference formulas written out in float64 numpy here,
independent of the implementation under test.
"""
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kellen.train.ema import ema_init, ema_update
from kellen.train.optimizers import adam_atan2, build_optimizer
from kellen.train.puzzle_emb import sparse_signsgd_update
from kellen.train.schedule import lr_multiplier, make_schedule


def _run(opt, params, grads_seq):
    """Apply `opt` for each grad in grads_seq under jit; return the param history."""
    state = opt.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    out = []
    for g in grads_seq:
        params, state = step(params, state, g)
        out.append(np.asarray(params, np.float64))
    return out


def _ref_adam_atan2(p, grads_seq, lrs, b1, b2, wd):
    """The adam-atan2 CUDA kernel, element-wise, in float64."""
    p = np.array(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = np.asarray(g, np.float64)
        p = p * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        p = p - (lr / bc1) * np.arctan2(m, np.sqrt(v) / np.sqrt(bc2))
        out.append(p.copy())
    return out


GRADS = [
    np.array([2.0, -0.5, 0.0, 1e-3], np.float32),
    np.array([-1.0, -0.5, 3.0, 0.0], np.float32),
    np.array([0.25, 4.0, -2.0, -1e-3], np.float32),
]
P0 = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


def test_adam_atan2_scalar_first_step_literal():
    # p=1, g=2, lr=0.1, wd=0.5, b1=0.9, b2=0.95, t=1:
    #   p *= 1 - 0.05              -> 0.95
    #   m = 0.1*2 = 0.2; v = 0.05*4 = 0.2; bc1 = 0.1; bc2 = 0.05
    #   sqrt(v)/sqrt(bc2) = sqrt(4) = 2; atan2(0.2, 2) = atan(0.1) = 0.0996686524911620
    #   p -= (0.1/0.1) * 0.0996686524911620 -> 0.8503313475088380
    (p1,) = _run(adam_atan2(0.1, b1=0.9, b2=0.95, weight_decay=0.5), jnp.array([1.0]), [jnp.array([2.0])])
    np.testing.assert_allclose(p1, [0.8503313475088380], rtol=1e-6)


def test_adam_atan2_three_steps_match_kernel_loop():
    opt = adam_atan2(0.1, b1=0.9, b2=0.95, weight_decay=0.5)
    got = _run(opt, jnp.asarray(P0), [jnp.asarray(g) for g in GRADS])
    want = _ref_adam_atan2(P0, GRADS, [0.1] * 3, 0.9, 0.95, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Zero gradient at step 1 (element 2): only the decay moves it.
    np.testing.assert_allclose(got[0][2], 0.5 * (1 - 0.05), rtol=1e-6)


def test_adam_atan2_with_schedule_uses_count_zero_first():
    sched = lambda count: 0.2 / (1.0 + count)  # 0.2, 0.1, 0.0667 for counts 0, 1, 2
    opt = adam_atan2(sched, b1=0.9, b2=0.95, weight_decay=0.5)
    got = _run(opt, jnp.asarray(P0), [jnp.asarray(g) for g in GRADS])
    want = _ref_adam_atan2(P0, GRADS, [0.2, 0.1, 0.2 / 3], 0.9, 0.95, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_adam_atan2_bf16_params_keep_f32_moments():
    opt = adam_atan2(0.1, weight_decay=0.0)
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    state = opt.init(params)
    u, state = opt.update({"w": jnp.full((3,), 2.0, jnp.bfloat16)}, state, params)
    assert state[0].mu["w"].dtype == jnp.float32 and state[0].nu["w"].dtype == jnp.float32
    new = optax.apply_updates(params, u)
    assert new["w"].dtype == jnp.bfloat16
    # Step 1 with wd=0: 1 - atan(0.1) = 0.9003313 = 230.48 * 2**-8 -> bf16 0.8984375.
    np.testing.assert_array_equal(np.asarray(new["w"], np.float64), 0.8984375)


@pytest.mark.parametrize("name", ["adam_atan2", "adam", "adamw", "lion"])
def test_build_optimizer_runs_under_jit(name):
    opt = build_optimizer(name, 1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    got = _run(opt, jnp.asarray(P0), [jnp.asarray(GRADS[0]), jnp.asarray(GRADS[1])])
    assert np.all(np.isfinite(got[-1]))
    assert not np.allclose(got[0], P0) and not np.allclose(got[1], got[0])


def test_build_optimizer_adam_is_torch_adam_with_l2():
    lr, b1, b2, wd, eps = 0.05, 0.9, 0.95, 0.1, 1e-8
    got = _run(build_optimizer("adam", lr, beta1=b1, beta2=b2, weight_decay=wd),
               jnp.asarray(P0), [jnp.asarray(g) for g in GRADS])
    # torch.optim.Adam (non-amsgrad, weight_decay as L2 on the gradient).
    p = P0.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(GRADS, start=1):
        g = g.astype(np.float64) + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
        p = p - (lr / (1 - b1**t)) * m / denom
        np.testing.assert_allclose(got[t - 1], p, rtol=1e-5, atol=1e-6)


def test_build_optimizer_adamw_decouples_decay():
    # Step 1 with g=0 except element 0: zero-grad elements move by decay only.
    lr, wd = 0.1, 0.5
    got = _run(build_optimizer("adamw", lr, beta1=0.9, beta2=0.95, weight_decay=wd),
               jnp.asarray(P0), [jnp.asarray(GRADS[0])])
    assert got[0][2] == pytest.approx(0.5 * (1 - lr * wd), rel=1e-6)
    # Element 0: adam step 1 is sign-like: m_hat/(sqrt(v_hat)+eps) = 2/(2+1e-8).
    assert got[0][0] == pytest.approx(1.0 * (1 - lr * wd) - lr * 2 / (2 + 1e-8), rel=1e-6)


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match=r"optimizer='sgd' must be one of adam_atan2, adam, adamw, lion"):
        build_optimizer("sgd", 1e-3, beta1=0.9, beta2=0.95, weight_decay=0.0)


# warmup=10, total=110, min_ratio=0.1 -> decay phase of 100 steps.
KW = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)


@pytest.mark.parametrize(
    "step,want",
    [
        (0, 0.0),
        (1, 0.1),
        (5, 0.5),
        (10, 1.0),  # progress 0: 0.1 + 0.9*0.5*(1+1)
        (35, 0.8681980515339464),  # progress 0.25: 0.1 + 0.45*(1+cos(pi/4))
        (60, 0.55),  # progress 0.5: cos(pi/2) = 0
        (110, 0.1),  # progress 1: cos(pi) = -1
        (160, 0.55),  # progress 1.5: unclamped reference formula rises again
    ],
)
def test_cosine_multiplier(step, want):
    assert float(lr_multiplier("cosine", step, **KW)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    "step,want", [(1, 0.1), (10, 1.0), (35, 0.775), (60, 0.55), (110, 0.1), (500, 0.1)]
)
def test_linear_multiplier(step, want):
    assert float(lr_multiplier("linear", step, **KW)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("step,want", [(0, 0.0), (3, 0.3), (10, 1.0), (110, 1.0), (1000, 1.0)])
def test_constant_multiplier(step, want):
    assert float(lr_multiplier("constant", step, **KW)) == pytest.approx(want, abs=1e-6)


def test_make_schedule_offsets_count_and_jits():
    sched = make_schedule("cosine", 2e-4, **KW)
    # optax count 0 is the reference's step 1.
    assert float(sched(0)) == pytest.approx(2e-4 * 0.1, rel=1e-6)
    assert float(sched(9)) == pytest.approx(2e-4, rel=1e-6)
    got = jax.jit(sched)(jnp.asarray(59, jnp.int32))
    assert float(got) == pytest.approx(2e-4 * 0.55, rel=1e-5)
    traced = jax.jit(lambda s: lr_multiplier("linear", s, **KW))(jnp.asarray(35.0))
    assert float(traced) == pytest.approx(0.775, abs=1e-6)


def test_unknown_schedule():
    with pytest.raises(ValueError, match=r"lr_schedule='foo' must be one of cosine, linear, constant"):
        make_schedule("foo", 1e-3, 1, 10, 0.1)
    with pytest.raises(ValueError, match=r"lr_schedule='foo'"):
        lr_multiplier("foo", 1, **KW)


def _signsgd_case():
    table = jnp.asarray([[r + 1.0, -(r + 1.0)] for r in range(6)], jnp.float32)
    ids = jnp.asarray([1, 3, 1, 5], jnp.int32)
    row_grads = jnp.asarray(
        [
            [0.5, 0.1],  # id 1
            [0.0, 0.0],  # id 3: zero gradient, decay only
            [-0.2, -0.1],  # id 1 again: sums to [0.3, 0.0] -> sign [1, 0]
            [-1e-3, 7.0],  # id 5 -> sign [-1, 1]
        ],
        jnp.float32,
    )
    # lr=0.1, wd=0.5: decay factor 0.95, step 0.1.
    want = np.array(
        [
            [1.0, -1.0],
            [2 * 0.95 - 0.1, -2 * 0.95],  # [1.8, -1.9]
            [3.0, -3.0],
            [4 * 0.95, -4 * 0.95],  # [3.8, -3.8]
            [5.0, -5.0],
            [6 * 0.95 + 0.1, -6 * 0.95 - 0.1],  # [5.8, -5.8]
        ]
    )
    return table, ids, row_grads, want


def test_sparse_signsgd_literal():
    table, ids, row_grads, want = _signsgd_case()
    got = sparse_signsgd_update(table, ids, row_grads, 0.1, 0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[[1, 5]], [[1.8, -1.9], [5.8, -5.8]], rtol=1e-6)


def test_sparse_signsgd_jit_and_no_dense_grad():
    table, ids, row_grads, want = _signsgd_case()
    fn = jax.jit(sparse_signsgd_update)
    got = fn(table, ids, row_grads, jnp.float32(0.1), 0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # With a large table, only the final scatter may produce an [N, D] value.
    big = jnp.zeros((100_000, 2), jnp.float32)
    jaxpr = jax.make_jaxpr(sparse_signsgd_update)(big, ids, row_grads, 0.1, 0.5)
    dense = [e.primitive.name for e in jaxpr.jaxpr.eqns for v in e.outvars if v.aval.shape == big.shape]
    assert dense == ["scatter"], dense


def test_sparse_signsgd_sharded_batch_and_table():
    # Needs several devices, which must be requested before jax starts: run a child.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from kellen.train.puzzle_emb import sparse_signsgd_update
        table = jnp.asarray([[r + 1.0, -(r + 1.0)] for r in range(8)], jnp.float32)
        ids = jnp.asarray([1, 3, 1, 5], jnp.int32)
        grads = jnp.asarray([[0.5, 0.1], [0.0, 0.0], [-0.2, -0.1], [-1e-3, 7.0]], jnp.float32)
        want = np.asarray(table).copy()
        want[1] = [1.8, -1.9]; want[3] = [3.8, -3.8]; want[5] = [5.8, -5.8]
        for axis_type in (AxisType.Auto, AxisType.Explicit):
            mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,))
            put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
            for tab in (table, put(table, "d", None)):
                out = jax.jit(sparse_signsgd_update)(tab, put(ids, "d"), put(grads, "d", None), 0.1, 0.5)
                np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]


def test_ema_two_updates_and_dtype():
    params = {"a": jnp.asarray([1.0, 2.0], jnp.float32), "b": jnp.asarray([4.0], jnp.bfloat16)}
    ema = ema_init(params)
    np.testing.assert_array_equal(np.asarray(ema["a"]), [1.0, 2.0])
    # shadow = 0.1*param + 0.9*shadow
    ema = ema_update(ema, {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([8.0], jnp.bfloat16)}, 0.9)
    np.testing.assert_allclose(np.asarray(ema["a"]), [1.2, 2.2], rtol=1e-6)
    # 4.4 rounds to bf16 4.40625.
    assert ema["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ema["b"], np.float64), [4.40625])
    ema = jax.jit(ema_update)(ema, {"a": jnp.asarray([5.0, 6.0]), "b": jnp.asarray([0.0], jnp.bfloat16)}, 0.9)
    np.testing.assert_allclose(np.asarray(ema["a"]), [1.58, 2.58], rtol=1e-6)
    # 0.9*4.40625 = 3.965625 -> bf16 3.96875.
    assert ema["b"].dtype == jnp.bfloat16 and ema["a"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ema["b"], np.float64), [3.96875])
