"""Tests for the offline maze generator (kellen.data.maze_gen)."""

from __future__ import annotations

import csv
import time
from collections import deque

import pytest

from kellen.data.maze_gen import generate_mazes, shortest_path_len, write_maze_csv

SIZE = 30


def _nbrs(i: int, size: int):
    r, c = divmod(i, size)
    for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
        if 0 <= nr < size and 0 <= nc < size:
            yield nr * size + nc


def _count_shortest_paths(q: str, size: int) -> int:
    """Independent BFS-layer DP: number of distinct shortest S->G paths."""
    s, g = q.index("S"), q.index("G")
    dist, ways = {s: 0}, {s: 1}
    frontier = deque([s])
    while frontier:
        u = frontier.popleft()
        for v in _nbrs(u, size):
            if q[v] == "#":
                continue
            if v not in dist:
                dist[v], ways[v] = dist[u] + 1, ways[u]
                frontier.append(v)
            elif dist[v] == dist[u] + 1:
                ways[v] += ways[u]
    return ways.get(g, 0)


def _check_puzzle(q: str, a: str, rating: int, size: int = SIZE) -> None:
    assert len(q) == len(a) == size * size
    assert set(q) <= set("# SG") and set(a) <= set("# SGo")
    assert q.count("S") == 1 and q.count("G") == 1
    for qc, ac in zip(q, a):
        assert ac == qc or (ac == "o" and qc == " ")
    # The labelled cells form a simple S->G path of `rating` moves, which is
    # also the BFS shortest distance (so the label is a shortest path).
    on_path = {i for i, ch in enumerate(a) if ch in "SGo"}
    assert a.count("o") == rating - 1
    assert rating == shortest_path_len(q, size) >= 1
    s, g = a.index("S"), a.index("G")
    for i in on_path:
        deg = sum(v in on_path for v in _nbrs(i, size))
        assert deg == (1 if i in (s, g) else 2), "labelled cells are not a simple path"
    seen, prev, cur, moves = {s}, -1, s, 0
    while cur != g:
        (nxt,) = [v for v in _nbrs(cur, size) if v in on_path and v != prev]
        prev, cur, moves = cur, nxt, moves + 1
        seen.add(cur)
    assert moves == rating and seen == on_path


@pytest.fixture(scope="module")
def plain():
    return generate_mazes(200, seed=0)


def test_shapes_charset_and_labels(plain):
    assert len(plain) == 200
    for q, a, rating in plain:
        _check_puzzle(q, a, rating)
    # Border is wall, and for even size the last lattice-free row/col too.
    q = plain[0][0]
    rows = [q[i * SIZE:(i + 1) * SIZE] for i in range(SIZE)]
    for k in (0, SIZE - 2, SIZE - 1):
        assert set(rows[k]) == {"#"} and {r[k] for r in rows} == {"#"}


def test_perfect_maze_is_a_tree(plain):
    q = plain[0][0]
    nodes = [i for i, ch in enumerate(q) if ch != "#"]
    edges = sum(1 for i in nodes for v in _nbrs(i, SIZE) if v > i and q[v] != "#")
    assert edges == len(nodes) - 1
    assert len(nodes) == 2 * 14 * 14 - 1


def test_min_path_len_honoured():
    rows = generate_mazes(100, seed=3, min_path_len=100)
    for q, a, rating in rows:
        assert rating >= 100
        _check_puzzle(q, a, rating)


def test_loops_keep_unique_shortest_path():
    rows = generate_mazes(100, seed=5, loop_prob=0.2)
    for q, a, rating in rows:
        _check_puzzle(q, a, rating)
        nodes = [i for i, ch in enumerate(q) if ch != "#"]
        edges = sum(1 for i in nodes for v in _nbrs(i, SIZE) if v > i and q[v] != "#")
        assert edges >= len(nodes), "expected cycles with loop_prob=0.2"
        assert _count_shortest_paths(q, SIZE) == 1


def test_odd_and_small_sizes():
    for size in (5, 6, 31):
        for q, a, rating in generate_mazes(20, seed=1, size=size, loop_prob=0.1):
            _check_puzzle(q, a, rating, size)
            assert _count_shortest_paths(q, size) == 1


def test_determinism(plain):
    assert generate_mazes(200, seed=0) == plain
    assert generate_mazes(10, seed=0) == plain[:10]  # per-puzzle rng streams
    assert generate_mazes(10, seed=1) != plain[:10]
    assert generate_mazes(5, seed=0, loop_prob=0.3) == generate_mazes(5, seed=0, loop_prob=0.3)
    assert len({q for q, _, _ in plain}) == len(plain)


def test_csv_round_trip(tmp_path, plain):
    path = tmp_path / "sub" / "maze.csv"
    write_maze_csv(path, plain[:20])
    with open(path, newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["source", "q", "a", "rating"]
    assert [tuple(r) for r in got[1:]] == [("generated", q, a, str(r)) for q, a, r in plain[:20]]
    assert all(len(r[1]) == SIZE * SIZE for r in got[1:])  # spaces preserved
    assert [p.name for p in path.parent.iterdir()] == ["maze.csv"]  # no temp left


def test_shortest_path_len_helper():
    q = "#####" "#S G#" "#####" "#####" "#####"
    assert shortest_path_len(q, 5) == 2
    assert shortest_path_len(q.replace(" ", "#"), 5) == -1
    with pytest.raises(ValueError):
        shortest_path_len(q[:-1], 5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(n=0, seed=0), "n"),
    (dict(n=1, seed=-1), "seed"),
    (dict(n=1, seed=0, size=4), "size"),
    (dict(n=1, seed=0, loop_prob=1.5), "loop_prob"),
    (dict(n=1, seed=0, loop_prob=-0.1), "loop_prob"),
    (dict(n=1, seed=0, min_path_len=-1), "min_path_len"),
    (dict(n=1, seed=0, min_path_len=900), "min_path_len"),
    (dict(n=1, seed=0, size=5, min_path_len=7), "min_path_len"),
])
def test_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_mazes(**kwargs)


def test_timing_1000(capsys):
    for mpl in (0, 100):
        t0 = time.perf_counter()
        rows = generate_mazes(1000, seed=0, min_path_len=mpl)
        dt = time.perf_counter() - t0
        assert len(rows) == 1000
        with capsys.disabled():
            print(f"\n1000 mazes size=30 min_path_len={mpl}: {dt:.2f}s")
