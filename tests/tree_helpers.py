"""Whole directory trees as data, for tests that compare what was written with what was expected."""
import os


def read_tree(root):
    """{relative path with '/': bytes} of every file under root."""
    out = {}
    for d, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = f.read()
    return out
