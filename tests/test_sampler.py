"""The sampler: reference training order as a pure function of (seed, step), per-process slices,
and test iteration whose padding never counts."""
import numpy as np
import pytest

import reference_reader  # tests/reference_reader.py
from kellen.data.format import IGNORE_LABEL, DataError, Metadata, PuzzleSet
from kellen.data.sampler import TrainSampler, eval_batches, num_eval_batches


def make_set(puzzle_sizes, group_sizes, seq_len=5, vocab=7, ignore=0, seed=0):
    """A synthetic set: example e has every token equal to e % (vocab - 1) + 1 in its inputs."""
    rng = np.random.default_rng(seed)
    pi = np.concatenate([[0], np.cumsum(puzzle_sizes)]).astype(np.int32)
    gi = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32)
    assert gi[-1] == len(puzzle_sizes)
    n = int(pi[-1])
    inputs = np.repeat((np.arange(n) % (vocab - 1) + 1)[:, None], seq_len, 1).astype(np.uint8)
    labels = rng.integers(0, vocab, (n, seq_len)).astype(np.uint8)
    ids = rng.integers(0, 3, len(puzzle_sizes)).astype(np.int32)
    meta = Metadata(pad_id=0, ignore_label_id=ignore, blank_identifier_id=0, vocab_size=vocab, seq_len=seq_len,
                    num_puzzle_identifiers=3, total_groups=len(group_sizes), mean_puzzle_examples=1.0,
                    total_puzzles=len(puzzle_sizes))
    return PuzzleSet("all", inputs, labels, ids, pi, gi), meta


def group_of(data, puzzles):
    return np.searchsorted(data.group_indices, puzzles, side="right") - 1


def test_single_example_puzzles_follow_the_reference_epoch_semantics():
    data, meta = make_set([1] * 60, [3] * 20)  # 20 groups of 3 augmentations, one example each
    s = TrainSampler(data, meta, global_batch_size=6, seed=1, epochs_per_iter=2)
    assert s.batches_in(0) == 40 // 6 == 6  # the last partial batch (4 rows) is dropped
    ex, pz = s.plan(0)
    groups = group_of(data, pz.ravel())
    # Two epochs concatenated: the first 20 draws are a permutation of the groups.
    assert sorted(groups[:20]) == list(range(20))
    assert np.array_equal(ex, data.puzzle_indices[pz])
    # One random puzzle per group: across iterations every augmentation gets picked.
    picked = {int(p) for it in range(30) for p in s.plan(it)[1].ravel()}
    assert picked == set(range(60))


def test_multi_example_puzzles_are_packed_as_the_reference_packs_them():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 6, 40)
    data, meta = make_set(sizes, [2] * 20)
    s = TrainSampler(data, meta, global_batch_size=8, seed=0)
    ex, pz = s.plan(0)
    assert ex.shape == pz.shape and ex.shape[1] == 8 and len(ex) >= 1
    seen_groups = []
    for row_ex, row_pz in zip(ex, pz):
        runs = np.split(np.arange(8), np.flatnonzero(np.diff(row_pz)) + 1)
        for k, run in enumerate(runs):
            p = row_pz[run[0]]
            lo, hi = data.puzzle_indices[p], data.puzzle_indices[p + 1]
            assert ((row_ex[run] >= lo) & (row_ex[run] < hi)).all()
            assert len(set(row_ex[run])) == len(run)  # without replacement
            if k < len(runs) - 1:  # only the puzzle that overflows the batch is cut
                assert len(run) == hi - lo
            seen_groups.append(group_of(data, [p])[0])
    assert len(set(seen_groups)) == len(seen_groups)  # each group at most once per epoch


def test_batch_at_a_step_is_a_pure_function_of_seed_and_step():
    data, meta = make_set(np.random.default_rng(1).integers(1, 4, 50), [5] * 10)
    a = TrainSampler(data, meta, 4, seed=7)
    straight = [b for _, b in zip(range(25), a.iter_from(0))]
    for step in (24, 3, 17, 0, 11):  # fresh sampler, random access, as after a restart
        b = TrainSampler(data, meta, 4, seed=7).batch(step)
        for k in b:
            assert np.array_equal(b[k], straight[step][1][k])
    resumed = TrainSampler(data, meta, 4, seed=7).iter_from(9)
    for step, batch in zip(range(9, 25), resumed):
        assert batch[0] == step and np.array_equal(batch[1]["inputs"], straight[step][1]["inputs"])
    other = TrainSampler(data, meta, 4, seed=8)
    assert not all(np.array_equal(other.batch(i)["inputs"], straight[i][1]["inputs"]) for i in range(5))


def test_each_process_builds_only_its_slice_of_the_global_batch():
    data, meta = make_set([1] * 64, [1] * 64)
    full = TrainSampler(data, meta, 16, seed=2)
    for procs in (2, 4):
        parts = [TrainSampler(data, meta, 16, seed=2, process_index=i, process_count=procs) for i in range(procs)]
        for step in (0, 5, 9):
            local = [p.batch(step) for p in parts]
            assert all(b["inputs"].shape == (16 // procs, 5) for b in local)
            for k in ("inputs", "labels", "puzzle_identifiers"):
                assert np.array_equal(np.concatenate([b[k] for b in local]), full.batch(step)[k])


def test_ignore_label_becomes_minus_100_and_dtypes_are_int32():
    data, meta = make_set([1] * 10, [1] * 10, ignore=0)
    b = TrainSampler(data, meta, 10, seed=0).batch(0)
    assert all(v.dtype == np.int32 for v in b.values())
    ex = TrainSampler(data, meta, 10, seed=0).global_indices(0)[0]
    raw = data.labels[ex].astype(np.int32)
    assert (raw == 0).any()
    assert np.array_equal(b["labels"], np.where(raw == 0, IGNORE_LABEL, raw))
    assert np.array_equal(b["inputs"], data.inputs[ex].astype(np.int32))


def test_eval_walks_the_whole_test_set_once_and_pads_with_ignored_rows():
    data, meta = make_set([2, 1, 3, 1, 1, 2, 1], [1] * 7)  # 11 examples
    assert num_eval_batches(data, 4) == 3
    for procs in (1, 2):
        rows, counts = [], []
        for rank in range(procs):
            batches = list(eval_batches(data, meta, 4, rank, procs))
            assert len(batches) == 3
            counts.append([n for _, n in batches])
            for b, _ in batches:
                assert b["inputs"].shape == (4 // procs, 5)
                real = (b["labels"] != IGNORE_LABEL).any(1) | (b["inputs"] != 0).any(1)
                pad = ~real
                assert (b["labels"][pad] == IGNORE_LABEL).all() and (b["inputs"][pad] == 0).all()
                rows.extend(b["inputs"][real][:, 0].tolist())
        assert counts[0] == [4, 4, 3] and all(c == counts[0] for c in counts)
        assert sorted(rows) == sorted((np.arange(11) % 6 + 1).tolist())


def test_eval_padding_is_not_counted_by_the_metrics():
    import jax.numpy as jnp

    from kellen.model.losses import act_loss_head
    data, meta = make_set([1] * 5, [1] * 5, ignore=None)
    batch, real = list(eval_batches(data, meta, 8))[0]
    assert real == 5
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 7)), jnp.float32)
    outputs = {"logits": logits, "q_halt_logits": jnp.zeros(8)}
    _, m = act_loss_head("softmax_cross_entropy", jnp.ones(8, bool), jnp.ones(8, jnp.int32),
                         jnp.asarray(batch["labels"]), outputs)
    assert int(m["count"]) == 5 and int(m["steps"]) == 5


def test_bad_sampler_settings_are_refused():
    data, meta = make_set([1] * 10, [1] * 10)
    with pytest.raises(DataError, match="global_batch_size=12 exceeds"):
        TrainSampler(data, meta, 12, seed=0)
    with pytest.raises(DataError, match="multiple of the 3 processes"):
        TrainSampler(data, meta, 8, seed=0, process_count=3)
    TrainSampler(data, meta, 12, seed=0, epochs_per_iter=2)  # two epochs hold a full batch


def test_our_training_batches_agree_with_the_reference_reader_in_kind(tmp_path):
    """Both samplers draw full batches of distinct groups from the same dataset file."""
    from kellen.data import format as fmt
    root = tmp_path / "ds"
    data, meta = make_set([1] * 24, [2] * 12)
    arrays = {k: getattr(data, k) for k in fmt.FIELDS}
    for split in fmt.SPLITS:
        fmt.write_split(str(root / split), meta, {"all": arrays})
    theirs = list(reference_reader.iter_train_epoch(str(root), 4, seed=0))
    ours = TrainSampler(fmt.load_split(str(root), "train").only_set(), meta, 4, seed=0)
    assert len(theirs) == ours.batches_in(0) == 3
    for k in range(3):
        _, pz = ours.global_indices(k)
        assert len(set(group_of(data, pz))) == 4
