"""Puzzle datasets: the reference layout, Sudoku and maze builders and generators, the sampler."""
