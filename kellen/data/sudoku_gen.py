"""Offline Sudoku puzzle generator (pure Python + numpy, no external data).

Pipeline for puzzle ``i`` of a call with ``seed``:

1. Fill a random complete grid by randomised backtracking (MRV branching,
   digits tried in random order) with naked/hidden-single propagation.
2. Visit the 81 cells in random order and remove a clue whenever the puzzle
   stays uniquely solvable, until ``min_clues`` clues remain.  One pass is
   enough for minimality: a removal that failed can never succeed later,
   since taking more clues away only adds solutions.  After blanking cell
   ``c`` (value ``v``) of a puzzle known to be unique, the puzzle is still
   unique iff it has *no* solution with ``c != v``.  If ``c`` is a naked or
   hidden single of the remaining clues, that is known without search.
3. Rate the final puzzle (see :func:`generate_sudoku`).

Each puzzle has its own RNG derived from ``(seed, i)``, so the output depends
only on ``(n, seed, min_clues)``, not on how many processes share the work.

Candidate sets are 9-bit ints (bit ``d-1`` set <=> digit ``d`` possible);
numpy only derives seeds, as scalar numpy ops are far slower than ints.
"""
from __future__ import annotations

import csv
import multiprocessing as mp
import operator
import os
import random
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ALL = 0x1FF  # all nine digits possible
ROW = [i // 9 for i in range(81)]
COL = [i % 9 for i in range(81)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)]
         + [[r * 9 + c for r in range(9)] for c in range(9)]
         + [[b // 3 * 27 + b % 3 * 3 + r * 9 + c for r in range(3) for c in range(3)]
            for b in range(9)])
UNIT_IDS = [(ROW[i], 9 + COL[i], 18 + BOX[i]) for i in range(81)]  # indices into UNITS
PEERS = [tuple(sorted({p for u in UNIT_IDS[i] for p in UNITS[u]} - {i})) for i in range(81)]
UNIT_GET = [(operator.itemgetter(*u), u) for u in UNITS]  # fetch a unit's 9 masks in C
POP = [bin(m).count("1") for m in range(512)]
SINGLE = [m if POP[m] == 1 else 0 for m in range(512)]  # mask -> itself if one digit
DIGIT = {1 << d: d + 1 for d in range(9)}  # single-bit mask -> digit
_PARALLEL_MIN_N = 32  # below this, process start-up costs more than it saves


def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Apply naked and hidden singles to ``cand`` in place; False on contradiction.

    ``queue`` holds cells that became singles whose digit is not yet removed
    from their peers.
    """
    while True:
        while queue:  # naked singles
            i = queue.pop()
            m = cand[i]
            for p in PEERS[i]:
                pm = cand[p]
                if pm & m:
                    pm ^= m
                    if not pm:
                        return False
                    cand[p] = pm
                    if not pm & (pm - 1):
                        queue.append(p)
        # Hidden singles: a digit with one possible cell in a unit goes there.
        # Unrolled over the 9 cells because this scan is the hot spot.
        S = SINGLE
        for get, unit in UNIT_GET:
            a, b, c, d, e, f, g, h, k = get(cand)
            twice = a & b
            once = a | b
            twice |= once & c; once |= c  # noqa: E702
            twice |= once & d; once |= d  # noqa: E702
            twice |= once & e; once |= e  # noqa: E702
            twice |= once & f; once |= f  # noqa: E702
            twice |= once & g; once |= g  # noqa: E702
            twice |= once & h; once |= h  # noqa: E702
            twice |= once & k; once |= k  # noqa: E702
            if once != ALL:
                return False  # some digit has no place left in this unit
            # Digits of solved cells also occur once; they are not news.
            hidden = once & ~(twice | S[a] | S[b] | S[c] | S[d] | S[e] | S[f] | S[g] | S[h] | S[k])
            if hidden:
                for i in unit:
                    m = cand[i] & hidden
                    if m:
                        if m & (m - 1):
                            return False  # one cell would need two digits
                        cand[i] = m
                        queue.append(i)
        if not queue:
            return True


def _solve(cand: list[int], queue: list[int], rng: random.Random | None, guesses: list[int]):
    """Depth-first search; returns the first solution (list of masks) or None.

    Branches on the unsolved cell with fewest candidates (MRV); digits are
    tried in random order if ``rng`` is given, else ascending.  Adds one to
    ``guesses[0]`` per digit tried at a branch.
    """
    if not _propagate(cand, queue):
        return None
    best, best_n = -1, 10
    for i in range(81):
        k = POP[cand[i]]
        if 1 < k < best_n:
            best, best_n = i, k
            if k == 2:
                break
    if best < 0:
        return cand  # every cell is a single: solved
    m = cand[best]
    bits = []
    while m:
        b = m & -m
        bits.append(b)
        m ^= b
    if rng is not None:
        rng.shuffle(bits)
    for b in bits:
        guesses[0] += 1
        child = cand[:]
        child[best] = b
        sol = _solve(child, [best], rng, guesses)
        if sol is not None:
            return sol
    return None


def _candidates(grid: list[int], used: list[int]) -> tuple[list[int], list[int]]:
    """Masks + propagation queue for ``grid`` (0 = blank); ``used[u]``: clue digits of unit u."""
    cand, queue = [], []
    for i, (r, c, b) in enumerate(UNIT_IDS):
        d = grid[i]
        if d:
            cand.append(1 << (d - 1))  # a clue's digit is already out of its peers
        else:
            m = ALL & ~(used[r] | used[c] | used[b])
            if not m & (m - 1):
                queue.append(i)  # single (or empty: propagation reports it)
            cand.append(m)
    return cand, queue


def _removal_keeps_unique(grid: list[int], used: list[int], c: int, v: int) -> bool:
    """Still unique after blanking cell ``c`` (was ``v``; ``grid``/``used`` already updated)?"""
    vb = 1 << (v - 1)

    def seen(i: int) -> int:  # clue digits among i's peers
        r, col, b = UNIT_IDS[i]
        return used[r] | used[col] | used[b]

    if seen(c) | vb == ALL:
        return True  # naked single: v is the only digit left for c
    for u in UNIT_IDS[c]:
        if all(grid[e] or seen(e) & vb for e in UNITS[u] if e != c):
            return True  # hidden single: v fits nowhere else in this unit
    cand, queue = _candidates(grid, used)
    cand[c] &= ~vb  # search for a solution with c != v (cand[c] keeps >= 1 digit)
    if not cand[c] & (cand[c] - 1):
        queue.append(c)
    return _solve(cand, queue, None, [0]) is None


def _make_one(seed: int, index: int, min_clues: int) -> tuple[str, str, int]:
    # Hash-free per-puzzle stream: SeedSequence mixes (seed, index) portably.
    words = np.random.SeedSequence([seed, index]).generate_state(4)
    rng = random.Random(sum(int(w) << (32 * k) for k, w in enumerate(words)))
    answer = [DIGIT[m] for m in _solve([ALL] * 81, [], rng, [0])]
    grid = answer[:]
    used = [ALL] * 27  # clue digits per unit, kept in step with grid
    order = list(range(81))
    rng.shuffle(order)
    clues = 81
    for c in order:
        if clues <= min_clues:
            break
        v = grid[c]
        vb = 1 << (v - 1)
        grid[c] = 0
        for u in UNIT_IDS[c]:
            used[u] ^= vb
        if _removal_keeps_unique(grid, used, c, v):
            clues -= 1
        else:
            grid[c] = v
            for u in UNIT_IDS[c]:
                used[u] |= vb
    guesses = [0]
    _solve(*_candidates(grid, used), None, guesses)  # rating: deterministic solve
    q = "".join(str(d) if d else "." for d in grid)
    return q, "".join(map(str, answer)), guesses[0]


def _make_chunk(args: tuple[int, list[int], int]) -> list[tuple[str, str, int]]:
    seed, indices, min_clues = args
    return [_make_one(seed, i, min_clues) for i in indices]


def _spawn_ok() -> bool:
    """spawn children re-import ``__main__``: impossible for e.g. ``python - < script``."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


def generate_sudoku(n: int, seed: int, min_clues: int = 17,
                    workers: int | None = None) -> list[tuple[str, str, int]]:
    """Generate ``n`` uniquely solvable puzzles as ``(question, answer, rating)``.

    ``question``/``answer`` are 81-char row-major strings ('.' = blank).
    Clues are removed in random order while uniqueness holds, stopping at
    ``min_clues``: 17 (default) yields minimal puzzles (typically 21-28
    clues, mean ~24); larger values yield easier puzzles with exactly that
    many clues.

    ``rating`` is a difficulty proxy: the number of digit guesses a
    deterministic solver (naked + hidden single propagation, MRV branching,
    digits ascending) makes before reaching the solution of the final puzzle
    from scratch; 0 means propagation alone solves it.

    The result depends only on ``(n, seed, min_clues)``; ``workers`` (default
    ``os.cpu_count()``) only sets how many spawned processes share the work.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    min_clues = _check_int("min_clues", min_clues, 17, 80)
    workers = _check_int("workers", (os.cpu_count() or 1) if workers is None else workers, 1)
    if workers == 1 or n < _PARALLEL_MIN_N or not _spawn_ok():
        return _make_chunk((seed, list(range(n)), min_clues))
    # Several strided chunks per worker balance the load (puzzle cost varies).
    n_chunks = min(n, workers * 4)
    chunks = [(seed, list(range(k, n, n_chunks)), min_clues) for k in range(n_chunks)]
    # spawn is safe even if the parent runs threads (e.g. JAX); the executor
    # raises if a worker dies instead of respawning it forever like Pool.
    with ProcessPoolExecutor(min(workers, n_chunks), mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_make_chunk, chunks))
    rows: list = [None] * n
    for (_, indices, _), part in zip(chunks, parts):
        for i, row in zip(indices, part):
            rows[i] = row
    return rows


def write_sudoku_csv(path, rows) -> None:
    """Write rows in the sudoku-extreme CSV layout (``source,q,a,rating``), atomically."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source", "q", "a", "rating"])
            for q, a, rating in rows:
                w.writerow(["generated", q, a, rating])
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def solve_count(question: str, limit: int = 2) -> int:
    """Count the solutions of ``question`` ('.' or '0' = blank), stopping at ``limit``.

    Deliberately simple and independent of the generator's solver: plain
    backtracking on the blank cell with fewest legal digits, no propagation.
    """
    if len(question) != 81:
        raise ValueError(f"question must have 81 characters, got {len(question)}")
    limit = _check_int("limit", limit, 1)
    g = [int(ch) if ch in "123456789" else 0 for ch in question]
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(g):
        if d:
            b = 1 << (d - 1)
            if (rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]]) & b:
                return 0  # clues clash
            rows[ROW[i]] |= b
            cols[COL[i]] |= b
            boxes[BOX[i]] |= b
    blanks = [i for i in range(81) if not g[i]]

    def count(found: int) -> int:
        best, best_free = -1, 0
        for i in blanks:
            if not g[i]:
                free = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
                if best < 0 or POP[free] < POP[best_free]:
                    best, best_free = i, free
                    if POP[free] <= 1:
                        break
        if best < 0:
            return found + 1  # no blanks left: one more solution
        r, c, x = ROW[best], COL[best], BOX[best]
        for d in range(9):
            b = 1 << d
            if best_free & b:
                g[best] = d + 1
                rows[r] |= b
                cols[c] |= b
                boxes[x] |= b
                found = count(found)
                g[best] = 0
                rows[r] ^= b
                cols[c] ^= b
                boxes[x] ^= b
                if found >= limit:
                    break
        return found

    return count(0)
