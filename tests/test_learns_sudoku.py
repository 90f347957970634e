"""End to end: a tiny TRM learns easy Sudoku on CPU within a few minutes.

Recipe (found by a small sweep on a shared 2-core CPU; every value is set below):

* Data: `generate_sudoku(min_clues=75)`, i.e. 6 blank cells per puzzle, all solvable by
  naked/hidden singles. 2000 training puzzles (seed 1000), 256 held-out test puzzles
  (seed 999999, checked disjoint from the training set), no augmentation, built with
  `build_split` (tokens digit+1, labels on all 81 cells).
* Model: hidden 32, mlp_t=True (sequence-axis SwiGLU instead of attention; expansion 4),
  L_layers 1, H_cycles 2, L_cycles 1, learned positions, no puzzle embedding
  (puzzle_emb_ndim 0), float32, softmax cross-entropy, halt_max_steps 2 (ACT with
  q-halting, exploration 0.1, no_ACT_continue).
* Optimiser: adam_atan2, lr 1e-2, 20 warmup steps, cosine to 0.1 x lr, weight decay 0,
  betas (0.9, 0.95); global batch 64; 400 train steps (ACT supervision steps).
* Eval: each test batch starts from `initial_carry` and runs `act_step(training=False)`
  halt_max_steps times (eval rows halt only at the last step); exact accuracy is read from
  the final step's metrics, and token accuracy on the blank cells from its predictions.

Why mlp_t: with attention instead (learned positions, hidden 32, lr 3e-3 constant, 3 blanks)
the model learned to copy the clues but its blank-cell accuracy stayed at chance (loss at
(blanks/81) ln 9) for all of ~600 steps; with mlp_t and otherwise the same settings it left
that plateau within ~100 steps, the sequence-axis MLP learning the row/column/box peer
structure directly. (RoPE attention was not tried.)

Observed (seeds 0/1/2, each varying the training puzzles (seed 1000+s), the sampler, the
init and the halting-exploration rng; same recipe and test set): exact accuracy 0.000 before
training in every run, 0.977 / 0.980 / 0.996 after; blank-cell accuracy ~0.07-0.10 before,
0.995-0.999 after. The thresholds below sit well under those (exact >= 0.7 after, <= 0.05
before; blank-cell >= 0.9 after, <= 0.3 before) so that thread scheduling or BLAS
differences cannot flip the test, while a model that failed to learn the rule (exact ~0,
or only copying the clues: blank accuracy ~0.1) still fails it. Total time was 130-165 s
on 2 heavily shared CPU cores (load average 6-9; data ~10 s, compiles ~20 s, training
~100-135 s); this file as committed (seed 0) ran in 156 s under pytest.
"""
import time

import jax
import numpy as np

from kellen.data.format import PuzzleSet
from kellen.data.sampler import TrainSampler, eval_batches
from kellen.data.sudoku import build_split
from kellen.data.sudoku_gen import generate_sudoku
from kellen.model.act import act_step, initial_carry
from kellen.model.config import TRMConfig
from kellen.train.step import OptimConfig, init_train_state, make_train_step

MIN_CLUES = 75
N_TRAIN, N_TEST = 2000, 256
TRAIN_SEED, TEST_SEED = 1000, 999_999
BATCH, STEPS, EVAL_BATCH = 64, 400, 256
SEED = 0

BLANK_TOKEN = 1  # digit 0 (blank) + 1


def _grids(strings):
    return np.array([[0 if ch == "." else int(ch) for ch in s] for s in strings], np.uint8)


def _make_set(n, seed):
    rows = generate_sudoku(n, seed, min_clues=MIN_CLUES, workers=1)
    meta, arrays = build_split(_grids(r[0] for r in rows), _grids(r[1] for r in rows), 0,
                               np.random.default_rng(seed))
    return meta, PuzzleSet("all", **arrays["all"]), {r[0] for r in rows}


def _evaluator(cfg, test, meta):
    @jax.jit
    def eval_batch(weights, batch):
        carry = initial_carry(cfg, batch)
        for _ in range(cfg.halt_max_steps):
            res = act_step(cfg, weights, carry, batch, training=False)
            carry = res["carry"]
        blank = (batch["inputs"] == BLANK_TOKEN) & (batch["labels"] != -100)
        right = blank & (res["outputs"]["preds"] == batch["labels"])
        return {"count": res["metrics"]["count"], "exact": res["metrics"]["exact_accuracy"],
                "blank_right": right.sum(), "blank": blank.sum()}

    def evaluate(weights):
        tot = {}
        for batch, _ in eval_batches(test, meta, EVAL_BATCH):
            for k, v in jax.device_get(eval_batch(weights, batch)).items():
                tot[k] = tot.get(k, 0) + int(v)
        assert tot["count"] == N_TEST
        return tot["exact"] / tot["count"], tot["blank_right"] / tot["blank"]

    return evaluate


def test_trm_learns_easy_sudoku():
    t0 = time.time()
    meta_tr, train, train_q = _make_set(N_TRAIN, TRAIN_SEED)
    meta_te, test, test_q = _make_set(N_TEST, TEST_SEED)
    assert not train_q & test_q, "held-out puzzles must not appear in the training set"
    assert (np.asarray(test.inputs) == BLANK_TOKEN).sum(1).tolist() == [81 - MIN_CLUES] * N_TEST
    t_data = time.time() - t0

    cfg = TRMConfig(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, H_cycles=2, L_cycles=1,
                    L_layers=1, hidden_size=32, num_heads=2, expansion=4.0, puzzle_emb_ndim=0,
                    puzzle_emb_len=0, pos_encodings="learned", mlp_t=True, forward_dtype="float32",
                    halt_max_steps=2, halt_exploration_prob=0.1, no_ACT_continue=True,
                    loss_type="softmax_cross_entropy")
    opt = OptimConfig(optimizer="adam_atan2", lr=1e-2, lr_warmup_steps=20, lr_min_ratio=0.1,
                      lr_schedule="cosine", weight_decay=0.0, beta1=0.9, beta2=0.95, ema=False)
    sampler = TrainSampler(train, meta_tr, BATCH, seed=SEED)
    state = init_train_state(cfg, opt, STEPS, jax.random.PRNGKey(SEED), sampler.batch(0))
    train_step = jax.jit(make_train_step(cfg, opt, STEPS, BATCH))
    evaluate = _evaluator(cfg, test, meta_te)

    exact0, blank0 = evaluate(state["weights"])

    t1 = time.time()
    key = jax.random.PRNGKey(10_000 + SEED)
    window = {}
    for step in range(STEPS):
        state, _, metrics = train_step(state, sampler.batch(step), jax.random.fold_in(key, step))
        metrics = jax.device_get(metrics)  # blocks: keep one step in flight on CPU
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + float(v)
        if (step + 1) % 100 == 0:
            c = max(window["count"], 1.0)
            print(f"step {step + 1}: lm_loss {window['lm_loss'] / c:.4f} "
                  f"train exact {window['exact_accuracy'] / c:.3f} steps {window['steps'] / c:.2f}")
            window = {}
    t_train = time.time() - t1

    exact1, blank1 = evaluate(state["weights"])
    print(f"test exact accuracy {exact0:.3f} -> {exact1:.3f}; blank-cell accuracy {blank0:.3f} -> {blank1:.3f}")
    print(f"data {t_data:.0f}s, training {t_train:.0f}s, total {time.time() - t0:.0f}s")

    assert exact0 <= 0.05, exact0
    assert blank0 <= 0.3, blank0
    assert blank1 >= 0.9, blank1
    assert exact1 >= 0.7, exact1
    assert exact1 - exact0 >= 0.6
