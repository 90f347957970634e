"""Losses and the ACT loss head against independent numpy float64 re-derivations.

The reference (models/losses.py of TinyRecursiveModels) computes stablemax cross-entropy as
    s(x) = 1/(1-x) for x < 0, x + 1 otherwise;  logprob = log(s / sum(s))
in float64. Everything expected here is re-derived in numpy float64 or written as literals.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kellen.model.losses import (IGNORE_LABEL_ID, act_loss_head, bce_with_logits, softmax_cross_entropy,
                                 stablemax_cross_entropy)

F32_EPS = float(np.finfo(np.float32).eps)


# ---- numpy float64 re-derivations ----------------------------------------------------------
def np_stablemax_logprobs(x):
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        s = np.where(x < 0, 1.0 / (1.0 - np.minimum(x, 0.0)), x + 1.0)
    return np.log(s / s.sum(-1, keepdims=True)), np.log(s.sum(-1))


def np_stablemax_ce(x, labels):
    labels = np.asarray(labels)
    lp, _ = np_stablemax_logprobs(x)
    mask = labels != IGNORE_LABEL_ID
    picked = np.take_along_axis(lp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    return np.where(mask, -picked, 0.0)


def np_softmax_ce(x, labels):
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    m = x.max(-1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    mask = labels != IGNORE_LABEL_ID
    picked = np.take_along_axis(lp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    return np.where(mask, -picked, 0.0)


def np_bce(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    sig = 1.0 / (1.0 + np.exp(-x))
    return -(y * np.log(sig) + (1.0 - y) * np.log(1.0 - sig))


def _random_logits(seed, shape, scale):
    rng = np.random.default_rng(seed)
    # Mixed signs, magnitudes spread over [0, scale] (log-uniform so small values also occur).
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(scale), shape))
    return (mag * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


# ---- stablemax ---------------------------------------------------------------------------------
def test_stablemax_literal_values():
    # s([1, -1, 0]) = [2, 1/2, 1], sum 3.5
    x = jnp.asarray([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
    out = np.asarray(stablemax_cross_entropy(x, jnp.asarray([0, 2]), jnp.ones((2,), bool)))
    np.testing.assert_allclose(out, [math.log(1.75), math.log(3.0)], rtol=1e-6)
    out = np.asarray(stablemax_cross_entropy(x, jnp.asarray([1, 1]), jnp.ones((2,), bool)))
    np.testing.assert_allclose(out, [math.log(7.0), math.log(3.0)], rtol=1e-6)


@pytest.mark.parametrize("vocab", [3, 11, 32])
def test_stablemax_f32_absolute_error_bound(vocab):
    """What the float32 path achieves: |err| <= 8 ulp(1) * max(1, log(sum s)) per token.

    Random mixed-sign logits up to 1e3; test_stablemax_f32_relative_error_docstring_claim
    checks the documented (stronger) relative claim.
    """
    x = _random_logits(vocab, (64, 16, vocab), 1e3)
    x[0, 0, :] = 1e3  # exact magnitude 1e3 present
    x[0, 1, :] = -1e3
    labels = np.random.default_rng(100 + vocab).integers(0, vocab, (64, 16))
    out = stablemax_cross_entropy(jnp.asarray(x), jnp.asarray(labels), jnp.ones(labels.shape, bool))
    assert out.dtype == jnp.float32
    expected = np_stablemax_ce(x, labels)
    _, log_sum = np_stablemax_logprobs(x)
    err = np.abs(np.asarray(out, np.float64) - expected)
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(err <= 8 * F32_EPS * np.maximum(1.0, np.abs(log_sum))), err.max()
    # tokens with a not-small loss also meet the documented relative tolerance
    big = expected > 8.0
    assert big.sum() > 10
    assert np.max(err[big] / expected[big]) < 1e-6


@pytest.mark.parametrize("vocab", [3, 11])
def test_stablemax_f32_relative_error_docstring_claim(vocab):
    """Per-token relative error < 1e-6 in float32, including tiny losses (dominant label)."""
    rng = np.random.default_rng(7 + vocab)
    x = (rng.uniform(-1.0, 1.0, (64, 16, vocab)) * 1e3).astype(np.float32)
    labels = rng.integers(0, vocab, (64, 16))
    out = np.asarray(stablemax_cross_entropy(jnp.asarray(x), jnp.asarray(labels), jnp.ones(labels.shape, bool)),
                     np.float64)
    expected = np_stablemax_ce(x, labels)
    rel = np.abs(out - expected) / np.abs(expected)
    assert rel.max() < 1e-6, rel.max()


def test_stablemax_runs_in_float64_with_x64():
    with jax.enable_x64(True):
        x = _random_logits(3, (8, 8, 11), 1e3).astype(np.float64)
        x[0, 0, 0] = 1e3
        labels = np.random.default_rng(4).integers(0, 11, (8, 8))
        labels[1, :3] = IGNORE_LABEL_ID
        mask = labels != IGNORE_LABEL_ID
        out = stablemax_cross_entropy(jnp.asarray(x, jnp.float64), jnp.asarray(labels), jnp.asarray(mask))
        assert out.dtype == jnp.float64
        # even float32 input is widened to float64 under x64
        out32in = stablemax_cross_entropy(jnp.asarray(x, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
        assert out32in.dtype == jnp.float64
        out = np.asarray(out)
    expected = np_stablemax_ce(x, labels)
    valid = expected != 0
    assert np.all(out[~valid] == 0.0)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-12, atol=0)
    # sanity of the fixture: the x64 path is far tighter than float32 could ever be
    assert np.max(np.abs(out - expected)) < 1e-12 * np.abs(expected).max()


def test_ignored_labels_contribute_zero():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 6, 5)) * 3).astype(np.float32)
    labels = rng.integers(0, 5, (4, 6))
    labels[0, :] = IGNORE_LABEL_ID
    labels[2, 1::2] = IGNORE_LABEL_ID
    mask = labels != IGNORE_LABEL_ID
    for fn in (stablemax_cross_entropy, softmax_cross_entropy):
        out = np.asarray(fn(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(mask)))
        assert np.all(out[~mask] == 0.0)
        assert np.all(out[mask] > 0.0)
    # the masked tokens' logits do not matter at all
    x2 = x.copy()
    x2[~mask] = 1e3 * rng.standard_normal(x2[~mask].shape)
    for fn in (stablemax_cross_entropy, softmax_cross_entropy):
        a = np.asarray(fn(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(mask)))
        b = np.asarray(fn(jnp.asarray(x2), jnp.asarray(labels), jnp.asarray(mask)))
        np.testing.assert_array_equal(a, b)


def test_softmax_cross_entropy_matches_numpy():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((8, 8, 11)) * 20).astype(np.float32)
    labels = rng.integers(0, 11, (8, 8))
    labels[3, 2:5] = IGNORE_LABEL_ID
    mask = labels != IGNORE_LABEL_ID
    out = softmax_cross_entropy(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    expected = np_softmax_ce(x, labels)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)
    # literal: uniform logits -> log(V)
    u = softmax_cross_entropy(jnp.zeros((1, 11)), jnp.asarray([4]), jnp.ones((1,), bool))
    np.testing.assert_allclose(np.asarray(u), [math.log(11.0)], rtol=1e-6)


# ---- BCE ---------------------------------------------------------------------------------------
def test_bce_with_logits_matches_formula():
    rng = np.random.default_rng(8)
    x = rng.uniform(-10, 10, (200,)).astype(np.float32)
    y = np.concatenate([np.zeros(50), np.ones(50), rng.uniform(0, 1, 100)]).astype(np.float32)
    out = np.asarray(bce_with_logits(jnp.asarray(x), jnp.asarray(y)), np.float64)
    np.testing.assert_allclose(out, np_bce(x, y), rtol=1e-5, atol=1e-6)
    # literals: BCE(0, y) = log 2 for any y; BCE(log 3, 1) = log(4/3)
    np.testing.assert_allclose(np.asarray(bce_with_logits(jnp.zeros(3), jnp.asarray([0.0, 0.3, 1.0]))),
                               [math.log(2.0)] * 3, rtol=1e-6)
    np.testing.assert_allclose(float(bce_with_logits(jnp.float32(math.log(3.0)), jnp.float32(1.0))),
                               math.log(4.0 / 3.0), rtol=1e-6)


def test_bce_with_logits_finite_at_large_logits():
    x = jnp.asarray([100.0, 100.0, -100.0, -100.0, 100.0], jnp.float32)
    y = jnp.asarray([1.0, 0.0, 1.0, 0.0, 0.25], jnp.float32)
    out = np.asarray(bce_with_logits(x, y))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.0, 100.0, 100.0, 0.0, 75.0], rtol=1e-6, atol=1e-30)
    g = np.asarray(jax.grad(lambda v: bce_with_logits(v, y).sum())(x))
    assert np.all(np.isfinite(g))
    # d/dx = sigmoid(x) - y
    np.testing.assert_allclose(g, [0.0, 1.0, -1.0, 0.0, 0.75], atol=1e-6)


# ---- ACT loss head -----------------------------------------------------------------------------
# B=3, seq 4, vocab 3.
LOGITS = np.array([
    # row 0: every token correct (argmax == label)
    [[3.0, -1.0, 0.5], [-2.0, 1.5, 0.0], [0.2, -0.3, 2.5], [-1.0, 4.0, -3.0]],
    # row 1: tokens 0, 1, 2 valid, token 2 wrong (argmax 0, label 2); token 3 ignored
    [[-0.5, 2.0, 1.0], [1.0, -1.0, 0.0], [2.0, 0.0, 1.9], [7.0, -7.0, 0.0]],
    # row 2: padding row, all labels ignored
    [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-5.0, 5.0, 0.0], [2.0, 2.0, -2.0]],
], np.float32)
LABELS = np.array([[0, 1, 2, 1], [1, 0, 2, IGNORE_LABEL_ID], [IGNORE_LABEL_ID] * 4], np.int32)
Q_HALT = np.array([2.0, 0.75, -1.5], np.float32)  # row 1 predicts "correct" but is wrong
Q_CONT = np.array([-0.5, 1.0, 0.25], np.float32)
STEPS = np.array([3, 5, 7], np.int32)


def _expected(halted, loss_type, target_q_continue=None):
    mask = LABELS != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    preds = LOGITS.argmax(-1)
    correct = mask & (preds == LABELS)
    seq_correct = correct.sum(-1) == counts
    rows = []
    ce = np_stablemax_ce if loss_type == "stablemax_cross_entropy" else np_softmax_ce
    per_tok = ce(LOGITS, LABELS)
    for b in range(3):
        rows.append(per_tok[b].sum() / max(counts[b], 1))
    lm = float(np.sum(rows))
    qh = float(np_bce(Q_HALT, seq_correct.astype(np.float64)).sum())
    exp = {"lm_loss": lm, "q_halt_loss": qh, "total": lm + 0.5 * qh}
    if target_q_continue is not None:
        qc = float(np_bce(Q_CONT, target_q_continue).sum())
        exp["q_continue_loss"] = qc
        exp["total"] += 0.5 * qc
    valid = [halted[b] and counts[b] > 0 for b in range(3)]
    exp["count"] = sum(valid)
    exp["accuracy"] = sum(correct[b].sum() / counts[b] for b in range(3) if valid[b])
    exp["exact_accuracy"] = sum(bool(seq_correct[b]) for b in range(3) if valid[b])
    exp["q_halt_accuracy"] = sum(bool((Q_HALT[b] >= 0) == seq_correct[b]) for b in range(3) if valid[b])
    exp["steps"] = sum(int(STEPS[b]) for b in range(3) if valid[b])
    return exp


def _run_head(halted, loss_type="stablemax_cross_entropy", target=None):
    outputs = {"logits": jnp.asarray(LOGITS), "q_halt_logits": jnp.asarray(Q_HALT),
               "q_continue_logits": jnp.asarray(Q_CONT)}
    if target is not None:
        outputs["target_q_continue"] = jnp.asarray(target, jnp.float32)
    total, metrics = act_loss_head(loss_type, jnp.asarray(halted), jnp.asarray(STEPS), jnp.asarray(LABELS), outputs)
    np.testing.assert_array_equal(np.asarray(outputs["preds"]), LOGITS.argmax(-1))
    return float(total), {k: np.asarray(v) for k, v in metrics.items()}


def _check(total, metrics, exp):
    assert int(metrics["count"]) == exp["count"]
    assert int(metrics["exact_accuracy"]) == exp["exact_accuracy"]
    assert int(metrics["q_halt_accuracy"]) == exp["q_halt_accuracy"]
    assert int(metrics["steps"]) == exp["steps"]
    np.testing.assert_allclose(float(metrics["accuracy"]), exp["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["lm_loss"]), exp["lm_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["q_halt_loss"]), exp["q_halt_loss"], rtol=1e-5)
    np.testing.assert_allclose(total, exp["total"], rtol=1e-5)
    if "q_continue_loss" in exp:
        np.testing.assert_allclose(float(metrics["q_continue_loss"]), exp["q_continue_loss"], rtol=1e-5)
    else:
        assert "q_continue_loss" not in metrics


def test_act_loss_head_all_halted_padding_row_not_counted():
    halted = np.array([True, True, True])
    total, metrics = _run_head(halted)
    exp = _expected(halted, "stablemax_cross_entropy")
    # hand-derived metric values: rows 0 and 1 count, padding row 2 does not
    assert (exp["count"], exp["exact_accuracy"], exp["q_halt_accuracy"], exp["steps"]) == (2, 1, 1, 8)
    np.testing.assert_allclose(exp["accuracy"], 1.0 + 2.0 / 3.0)
    _check(total, metrics, exp)
    # Padding row contributes nothing to lm_loss (its per-token losses are all masked).
    row0 = np_stablemax_ce(LOGITS[:1], LABELS[:1]).sum() / 4
    row1 = np_stablemax_ce(LOGITS[1:2], LABELS[1:2]).sum() / 3
    np.testing.assert_allclose(float(metrics["lm_loss"]), row0 + row1, rtol=1e-5)
    # Padding row's seq_correct is True (0 == 0 correct of 0), as in the reference: BCE(q, 1).
    qh = np_bce(2.0, 1.0) + np_bce(0.75, 0.0) + np_bce(-1.5, 1.0)
    np.testing.assert_allclose(float(metrics["q_halt_loss"]), qh, rtol=1e-5)


def test_act_loss_head_row_not_halted():
    halted = np.array([False, True, True])
    total, metrics = _run_head(halted)
    exp = _expected(halted, "stablemax_cross_entropy")
    assert (exp["count"], exp["exact_accuracy"], exp["q_halt_accuracy"], exp["steps"]) == (1, 0, 0, 5)
    np.testing.assert_allclose(exp["accuracy"], 2.0 / 3.0)
    _check(total, metrics, exp)
    # losses do not depend on halting
    total_all, metrics_all = _run_head(np.array([True, True, True]))
    np.testing.assert_allclose(total, total_all, rtol=1e-6)

    halted = np.array([True, False, True])
    total, metrics = _run_head(halted)
    exp = _expected(halted, "stablemax_cross_entropy")
    assert (exp["count"], exp["exact_accuracy"], exp["q_halt_accuracy"], exp["steps"]) == (1, 1, 1, 3)
    _check(total, metrics, exp)


def test_act_loss_head_nothing_halted_counts_zero():
    total, metrics = _run_head(np.array([False, False, False]))
    for k in ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps"):
        assert float(metrics[k]) == 0.0
    assert total > 0.5


def test_act_loss_head_softmax_variant():
    halted = np.array([True, True, True])
    total, metrics = _run_head(halted, "softmax_cross_entropy")
    _check(total, metrics, _expected(halted, "softmax_cross_entropy"))


def test_act_loss_head_with_q_continue_target():
    halted = np.array([True, False, True])
    target = np.array([0.9, 0.2, 0.5], np.float32)
    total, metrics = _run_head(halted, target=target)
    exp = _expected(halted, "stablemax_cross_entropy", target_q_continue=target)
    _check(total, metrics, exp)
    np.testing.assert_allclose(total, exp["lm_loss"] + 0.5 * exp["q_halt_loss"] + 0.5 * exp["q_continue_loss"],
                               rtol=1e-6)
    total_plain, _ = _run_head(halted)
    assert total - total_plain > 0.1  # the q_continue term is really added
