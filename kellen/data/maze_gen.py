"""Offline generator of random mazes with unique shortest-path labels.

Output follows the CSV layout of the TRM reference dataset ``maze-30x30-hard-1k``:
header ``source,q,a,rating``; ``q``/``a`` are row-major strings of length
``size*size`` over the charset ``# SGo`` (``#`` wall, space open, ``S`` start,
``G`` goal, ``o`` a cell on the shortest S->G path, only in ``a``); ``rating``
is the number of moves of that shortest path (4-neighbour moves).

Mazes are perfect mazes (randomised DFS) on the odd-coordinate lattice inside
the grid, optionally with extra interior walls knocked down (``loop_prob``) to
create cycles. S/G are chosen so that the shortest path is unique, which makes
the ``a`` label well defined.

Usage: ``python -m kellen.data.maze_gen out.csv --n 1000 --seed 0``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from collections import deque
from typing import Iterable

import numpy as np

CHARSET = "# SGo"
_MAX_MAZES_PER_PUZZLE = 1000  # give up (RuntimeError) rather than loop forever
_S_TRIES_PER_MAZE = 8  # cheaper to retry S on the same maze than to rebuild it


def _carve_perfect_maze(rng: np.random.Generator, size: int) -> np.ndarray:
    """Randomised DFS spanning tree over the m x m lattice of odd coordinates."""
    m = (size - 1) // 2  # lattice cells per dimension: 1, 3, ..., 2m-1 <= size-2
    # One random neighbour order per cell, drawn in a single rng call for speed.
    orders = rng.random((m * m, 4)).argsort(axis=1).tolist()
    steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
    visited = [False] * (m * m)
    carved: list[int] = []  # flat grid indices of open cells
    start = int(rng.integers(m * m))
    stack = [(start, -1)]
    while stack:
        cell, parent = stack.pop()
        if visited[cell]:
            continue
        visited[cell] = True
        r, c = divmod(cell, m)
        carved.append((2 * r + 1) * size + 2 * c + 1)
        if parent >= 0:  # open the wall between the cell and its DFS parent
            pr, pc = divmod(parent, m)
            carved.append((r + pr + 1) * size + c + pc + 1)
        for k in orders[cell]:
            nr, nc = r + steps[k][0], c + steps[k][1]
            if 0 <= nr < m and 0 <= nc < m and not visited[nr * m + nc]:
                stack.append((nr * m + nc, cell))
    grid = np.zeros(size * size, dtype=bool)
    grid[carved] = True
    return grid.reshape(size, size)


def _add_loops(grid: np.ndarray, rng: np.random.Generator, loop_prob: float) -> None:
    """Open walls that separate two lattice cells, each with prob. loop_prob."""
    size = grid.shape[0]
    hi = 2 * ((size - 1) // 2)  # one past the last lattice coordinate
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    inside = (r >= 1) & (r < hi) & (c >= 1) & (c < hi)
    # Exactly one even coordinate = a wall between two lattice cells (never a
    # pillar, so no open 2x2 blocks which would create many tied paths).
    between = inside & ((r % 2) != (c % 2))
    grid |= between & (rng.random(grid.shape) < loop_prob)


def _bfs_counts(open_: list[bool], size: int, src: int) -> tuple[list[int], list[int]]:
    """BFS distances from src plus number of shortest paths (capped at 2)."""
    n = size * size
    dist = [-1] * n
    cnt = [0] * n
    dist[src], cnt[src] = 0, 1
    q = deque([src])
    offs = (-size, size, -1, 1)  # border is all wall, so no index wrap-around
    while q:
        u = q.popleft()
        du, cu = dist[u] + 1, cnt[u]
        for o in offs:
            v = u + o
            if not open_[v]:
                continue
            if dist[v] < 0:
                dist[v], cnt[v] = du, cu
                q.append(v)
            elif dist[v] == du:
                cnt[v] = min(cnt[v] + cu, 2)  # only "1 vs many" matters
    return dist, cnt


def _one_puzzle(rng: np.random.Generator, size: int, min_path_len: int,
                loop_prob: float) -> tuple[str, str, int]:
    need = max(min_path_len, 1)  # S and G must be distinct cells
    for _ in range(_MAX_MAZES_PER_PUZZLE):
        grid = _carve_perfect_maze(rng, size)
        if loop_prob > 0:
            _add_loops(grid, rng, loop_prob)
        flat = grid.ravel()
        open_ = flat.tolist()
        cells = np.flatnonzero(flat)
        for _ in range(_S_TRIES_PER_MAZE):
            s = int(cells[rng.integers(len(cells))])
            dist, cnt = _bfs_counts(open_, size, s)
            d, c = np.asarray(dist), np.asarray(cnt)
            # Only goals with exactly one shortest path give an unambiguous label.
            cands = np.flatnonzero((d >= need) & (c == 1))
            if len(cands) == 0:
                continue
            g = int(cands[rng.integers(len(cands))])
            # Walk back from G; count==1 guarantees a single predecessor per step.
            path, v = [], g
            while dist[v] > 1:
                v = next(v + o for o in (-size, size, -1, 1)
                         if open_[v + o] and dist[v + o] == dist[v] - 1)
                path.append(v)
            chars = np.where(flat, ord(" "), ord("#")).astype(np.uint8)
            chars[s], chars[g] = ord("S"), ord("G")
            q = chars.tobytes().decode("ascii")
            chars[path] = ord("o")
            return q, chars.tobytes().decode("ascii"), dist[g]
    raise RuntimeError(
        f"could not place S/G with min_path_len={min_path_len} and a unique "
        f"shortest path after {_MAX_MAZES_PER_PUZZLE} mazes (size={size}, "
        f"loop_prob={loop_prob}); lower min_path_len or loop_prob")


def generate_mazes(n: int, seed: int, size: int = 30, min_path_len: int = 0,
                   loop_prob: float = 0.0) -> list[tuple[str, str, int]]:
    """Generate ``n`` puzzles as ``(q, a, rating)`` tuples.

    Puzzle ``i`` uses ``np.random.default_rng([seed, i])``, so the output is a
    deterministic function of the arguments and any prefix of a larger run
    equals a smaller run with the same seed.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 5:
        raise ValueError(f"size must be an integer >= 5, got {size!r}")
    if not isinstance(min_path_len, (int, np.integer)) or min_path_len < 0:
        raise ValueError(f"min_path_len must be an integer >= 0, got {min_path_len!r}")
    if not (0.0 <= float(loop_prob) <= 1.0):
        raise ValueError(f"loop_prob must be in [0, 1], got {loop_prob!r}")
    m = (size - 1) // 2
    # A shortest path alternates lattice cells and passages and visits each
    # lattice cell at most once, so it has at most 2*m*m - 2 moves (with or
    # without loops); beyond that no maze can satisfy the request.
    max_len = 2 * m * m - 2
    if min_path_len > max_len:
        raise ValueError(
            f"min_path_len={min_path_len} is impossible for size={size} "
            f"(longest possible shortest path is {max_len})")
    return [_one_puzzle(np.random.default_rng([int(seed), i]), int(size),
                        int(min_path_len), float(loop_prob)) for i in range(n)]


def write_maze_csv(path: str | os.PathLike, rows: Iterable[tuple[str, str, int]]) -> None:
    """Write ``source,q,a,rating`` CSV atomically (temp file + os.replace)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".maze_", suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source", "q", "a", "rating"])
            for q, a, rating in rows:
                w.writerow(["generated", q, a, int(rating)])
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def shortest_path_len(q: str, size: int) -> int:
    """BFS distance in moves from S to G in a puzzle string (-1 if unreachable).

    Deliberately independent of the generator (2-D coordinates, explicit bounds
    checks) so it can be used to verify the generated labels.
    """
    if len(q) != size * size:
        raise ValueError(f"q has length {len(q)}, expected size*size={size * size}")
    if q.count("S") != 1 or q.count("G") != 1:
        raise ValueError("q must contain exactly one 'S' and one 'G'")
    rows = [q[i * size:(i + 1) * size] for i in range(size)]
    start = divmod(q.index("S"), size)
    seen = {start: 0}
    frontier = deque([start])
    while frontier:
        r, c = frontier.popleft()
        if rows[r][c] == "G":
            return seen[(r, c)]
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if (0 <= nr < size and 0 <= nc < size and rows[nr][nc] != "#"
                    and (nr, nc) not in seen):
                seen[(nr, nc)] = seen[(r, c)] + 1
                frontier.append((nr, nc))
    return -1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output CSV path")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=30)
    p.add_argument("--min-path-len", type=int, default=0)
    p.add_argument("--loop-prob", type=float, default=0.0)
    a = p.parse_args(argv)
    rows = generate_mazes(a.n, a.seed, a.size, a.min_path_len, a.loop_prob)
    write_maze_csv(a.out, rows)
    print(f"wrote {len(rows)} mazes to {a.out}")


if __name__ == "__main__":
    main()
