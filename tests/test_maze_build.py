"""Maze CSV parsing (with row-precise errors) and the dihedral augmentation."""
import numpy as np
import pytest

from kellen.data import maze
from kellen.data.format import DataError

ROWS = ["#####", "#S  #", "# # #", "#  G#", "#####"]
QM = "".join(ROWS)
AM = "".join(["#####", "#Soo#", "# #o#", "#  G#", "#####"])


def write(tmp_path, rows):
    p = tmp_path / "m.csv"
    import csv
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "q", "a", "rating"])
        w.writerows(rows)
    return str(p)


def test_reads_tokens_in_charset_order(tmp_path):
    q, a = maze.read_csv(write(tmp_path, [("x", QM, AM, "4")]))
    assert q.shape == (1, 5, 5) and q.dtype == np.uint8
    assert q[0, 0, 0] == 1 and q[0, 1, 2] == 2 and q[0, 1, 1] == 3 and q[0, 3, 3] == 4 and a[0, 1, 2] == 5


@pytest.mark.parametrize("row,why", [
    (("x", QM[:-1], AM, "0"), "row 3: column q has 24 characters, expected 25"),
    (("x", QM, AM[:-1] + "x", "0"), "row 3: column a has 'x'; outside the charset"),
    (("x", QM, AM.replace("#", " ", 1), "0"), "row 3: the answer changes a cell other than"),
    (("x", QM.replace(" ", "S", 1), AM.replace("o", "S", 1), "0"), "row 3: the maze needs exactly one 'S'"),
])
def test_malformed_rows_are_named_by_file_and_row(tmp_path, row, why):
    path = write(tmp_path, [("x", QM, AM, "4"), row])
    with pytest.raises(DataError) as e:
        maze.read_csv(path)
    assert str(e.value).startswith(path + ": ") and why in str(e.value)


def test_non_square_first_row(tmp_path):
    with pytest.raises(DataError, match="row 2: column q has 24 characters, not a square grid"):
        maze.read_csv(write(tmp_path, [("x", QM[:-1], AM[:-1], "4")]))


def test_dihedral_images_are_the_reference_transforms_in_order():
    g = np.arange(16).reshape(1, 4, 4)
    x = g[0]
    expected = [x, np.rot90(x, 1), np.rot90(x, 2), np.rot90(x, 3), np.fliplr(x), np.flipud(x), x.T,
                np.fliplr(np.rot90(x, 1))]
    out = maze.dihedral(g)
    assert out.shape == (1, 8, 4, 4)
    for tid in range(8):
        assert np.array_equal(out[0, tid], expected[tid]), tid
    assert len({out[0, t].tobytes() for t in range(8)}) == 8


def test_build_groups_the_eight_images():
    q = np.frombuffer(QM.encode(), np.uint8).reshape(1, 5, 5)
    tok = maze._TOKEN[q]
    meta, sets = maze.build_split(np.repeat(tok, 3, 0), np.repeat(tok, 3, 0), aug=True)
    arr = sets["all"]
    assert arr["inputs"].shape == (24, 25) and arr["group_indices"].tolist() == [0, 8, 16, 24]
    assert meta.seq_len == 25 and meta.vocab_size == 6 and meta.total_groups == 3
