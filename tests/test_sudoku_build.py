"""Sudoku CSV parsing (with row-precise errors) and the vectorised augmentation."""
import numpy as np
import pytest

from kellen.data import sudoku
from kellen.data.build import subsample
from kellen.data.format import DataError

Q = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
A = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def write(tmp_path, rows, header="source,q,a,rating"):
    p = tmp_path / "s.csv"
    p.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return str(p)


def test_reads_digits_with_dot_or_zero_blanks(tmp_path):
    path = write(tmp_path, [("x", Q, A, "3"), ("x", Q.replace(".", "0"), A, "9")])
    q, a = sudoku.read_csv(path)
    assert q.dtype == np.uint8 and q.shape == (2, 81)
    assert np.array_equal(q[0], q[1]) and (q[0] == 0).sum() == Q.count(".")
    assert a[0, 0] == 5
    q, _ = sudoku.read_csv(path, min_difficulty=5)
    assert len(q) == 1


@pytest.mark.parametrize("row,why", [
    (("x", Q[:80], A, "0"), "row 3: column q has 80 characters, expected 81"),
    (("x", Q, A + "1", "0"), "row 3: column a has 82 characters"),
    (("x", Q[:-1] + "x", A, "0"), "row 3: column q has 'x'"),
    (("x", "1" + Q[1:], A, "0"), "row 3: answer disagrees with a clue"),
    (("x", Q, A[:-1] + ".", "0"), "row 3: answer has blanks"),
    (("x", Q.replace("5", ".", 1), A[:2] + A[3] + A[2] + A[4:], "0"), "row 3: answer repeats a digit in a column"),
    (("x", Q, A), "row 3: expected 4 columns"),
])
def test_malformed_rows_are_named_by_file_and_row(tmp_path, row, why):
    path = write(tmp_path, [("x", Q, A, "1"), row])
    with pytest.raises(DataError) as e:
        sudoku.read_csv(path)
    assert str(e.value).startswith(path + ": ") and why in str(e.value)


def test_missing_empty_and_bad_rating(tmp_path):
    with pytest.raises(DataError, match="nope.csv: missing file"):
        sudoku.read_csv(str(tmp_path / "nope.csv"))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv: empty file"):
        sudoku.read_csv(str(tmp_path / "e.csv"))
    path = write(tmp_path, [("x", Q, A, "hard")])
    with pytest.raises(DataError, match="row 2: rating 'hard' is not an integer"):
        sudoku.read_csv(path, min_difficulty=1)


def naive_shuffle(grid, p, k):
    """The issue's definition, cell by cell: transpose, then new (i, j) = old (rows[i], cols[j]), then digits."""
    x = grid.reshape(9, 9)
    if p["transpose"][k]:
        x = x.T
    out = np.zeros((9, 9), np.uint8)
    for i in range(9):
        for j in range(9):
            out[i, j] = p["digit_map"][k][x[p["rows"][k][i], p["cols"][k][j]]]
    return out.ravel()


def test_vectorised_shuffles_equal_the_cell_by_cell_definition():
    rng = np.random.default_rng(0)
    q = np.frombuffer(Q.replace(".", "0").encode(), np.uint8) - ord("0")
    a = np.frombuffer(A.encode(), np.uint8) - ord("0")
    grids = np.stack([q, a])
    origin = rng.integers(0, 2, 300)
    p = sudoku.draw_shuffles(300, rng)
    assert set(p["transpose"]) == {True, False}
    for k in range(300):
        assert p["digit_map"][k][0] == 0 and sorted(p["digit_map"][k][1:]) == list(range(1, 10))
        for perm in (p["rows"][k], p["cols"][k]):
            assert sorted(perm) == list(range(9))
            assert all(len({v // 3 for v in perm[b * 3:b * 3 + 3]}) == 1 for b in range(3))  # bands stay whole
    (out,) = sudoku.apply_shuffles([grids], origin, p)
    for k in range(300):
        assert np.array_equal(out[k], naive_shuffle(grids[origin[k]], p, k))


def test_augmented_groups_stay_valid_and_consistent():
    q = np.frombuffer(Q.replace(".", "0").encode(), np.uint8)[None] - ord("0")
    a = np.frombuffer(A.encode(), np.uint8)[None] - ord("0")
    meta, sets = sudoku.build_split(q, a, 50, np.random.default_rng(1))
    arr = sets["all"]
    assert meta.total_groups == 1 and arr["group_indices"].tolist() == [0, 51]
    qs, as_ = arr["inputs"].astype(int) - 1, arr["labels"].astype(int) - 1
    sudoku.check_solutions(qs.astype(np.uint8), as_.astype(np.uint8), "aug", np.arange(51))
    assert len({r.tobytes() for r in qs}) == 51


def test_subsample_is_seeded():
    q = np.arange(100)[:, None].repeat(81, 1).astype(np.uint8)
    a1, _ = subsample(q, q, 10, np.random.default_rng(4))
    a2, _ = subsample(q, q, 10, np.random.default_rng(4))
    a3, _ = subsample(q, q, 10, np.random.default_rng(5))
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3) and len(set(a1[:, 0])) == 10
    assert subsample(q, q, 1000, np.random.default_rng(0))[0] is q
