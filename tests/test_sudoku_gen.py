"""Tests for the offline Sudoku generator (kellen.data.sudoku_gen)."""
import csv
import statistics

import pytest

from kellen.data.sudoku_gen import generate_sudoku, solve_count, write_sudoku_csv

DIGITS = set("123456789")


def _clues(q: str) -> int:
    return sum(ch != "." for ch in q)


def _is_valid_solution(a: str) -> bool:
    g = [a[r * 9:(r + 1) * 9] for r in range(9)]
    rows = [set(r) for r in g]
    cols = [{g[r][c] for r in range(9)} for c in range(9)]
    boxes = [{g[br * 3 + r][bc * 3 + c] for r in range(3) for c in range(3)}
             for br in range(3) for bc in range(3)]
    return all(u == DIGITS for u in rows + cols + boxes)


@pytest.fixture(scope="module")
def minimal():
    """50 minimal puzzles (seed 0) and 30 more (seed 1), generated once."""
    return {0: generate_sudoku(50, seed=0, workers=1), 1: generate_sudoku(30, seed=1, workers=1)}


@pytest.fixture(scope="module")
def easy():
    return generate_sudoku(30, seed=2, min_clues=40, workers=1)


def test_puzzles_valid_and_unique(minimal, easy):
    for rows in (minimal[0][:30], minimal[1], easy):
        assert len(rows) == 30
        for q, a, rating in rows:
            assert len(q) == 81 and len(a) == 81
            assert set(q) <= DIGITS | {"."} and set(a) <= DIGITS
            assert _is_valid_solution(a)
            assert all(qc == "." or qc == ac for qc, ac in zip(q, a))
            assert solve_count(q) == 1  # independent backtracking check


def test_min_clues_controls_difficulty(minimal, easy):
    easy_counts = [_clues(q) for q, _, _ in easy]
    assert all(c >= 40 for c in easy_counts)
    assert sum(c == 40 for c in easy_counts) >= 0.9 * len(easy_counts)
    hard_counts = [_clues(q) for q, _, _ in minimal[0]]
    assert statistics.mean(hard_counts) < 30
    assert max(hard_counts) < min(easy_counts)


def test_minimal_puzzles_are_minimal(minimal):
    # min_clues=17 is never reached, so no single clue can be removed.
    for q, _, _ in [row for row in minimal[1] if _clues(row[0]) > 17][:5]:
        for i, ch in enumerate(q):
            if ch != ".":
                assert solve_count(q[:i] + "." + q[i + 1:]) == 2


def test_determinism(minimal):
    assert generate_sudoku(50, seed=0, workers=1) == minimal[0]
    assert generate_sudoku(30, seed=1, workers=1) == minimal[1]
    assert [r[0] for r in minimal[0][:30]] != [r[0] for r in minimal[1]]
    # 40 >= the parallel threshold, so this uses two spawned processes.
    assert generate_sudoku(40, seed=0, workers=2) == minimal[0][:40]
    assert generate_sudoku(3, seed=0, workers=1) == minimal[0][:3]  # prefix-stable


def test_ratings(minimal):
    ratings = [r for _, _, r in minimal[0]]
    assert all(isinstance(r, int) and r >= 0 for r in ratings)
    assert any(r > 0 for r in ratings)


def test_csv_round_trip(tmp_path, minimal):
    rows = minimal[0][:5]
    path = tmp_path / "sudoku.csv"
    write_sudoku_csv(path, rows)
    with open(path, newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["source", "q", "a", "rating"]
    assert got[1:] == [["generated", q, a, str(r)] for q, a, r in rows]
    assert [p.name for p in tmp_path.iterdir()] == ["sudoku.csv"]  # no temp file left


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0, seed=0), "n"),
    (dict(n=1, seed=-1), "seed"),
    (dict(n=1, seed=0, min_clues=16), "min_clues"),
    (dict(n=1, seed=0, min_clues=81), "min_clues"),
    (dict(n=1, seed=0, workers=0), "workers"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_sudoku(**kwargs)


def _deadly_rectangle(a: str):
    """Cells (r1,c1),(r1,c2),(r2,c1),(r2,c2) holding x,y / y,x in two boxes, or None."""
    g = [[a[r * 9 + c] for c in range(9)] for r in range(9)]
    for r1 in range(9):
        for r2 in range(r1 + 1, 9):
            if r1 // 3 != r2 // 3:
                continue  # rows in one band, columns in two stacks => two boxes
            for c1 in range(9):
                for c2 in range(c1 + 1, 9):
                    if c1 // 3 != c2 // 3 and g[r1][c1] == g[r2][c2] and g[r1][c2] == g[r2][c1]:
                        return [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
    return None


def test_solve_count_two_solutions(minimal):
    for _, a, _ in minimal[0]:
        cells = _deadly_rectangle(a)
        if cells:
            break
    assert cells, "no unavoidable rectangle found in 50 grids"
    q = "".join("." if i in cells else ch for i, ch in enumerate(a))
    assert solve_count(q) == 2
    assert solve_count(q, limit=10) == 2  # exactly two, not just "at least"
    assert solve_count(a) == 1
    assert solve_count("11" + "." * 79) == 0
    assert solve_count("." * 81, limit=3) == 3
