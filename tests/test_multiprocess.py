"""Multi-process JAX on CPU: two processes joined by jax.distributed on 127.0.0.1 (2 devices
each) train exactly as one process with 4 devices, same global batch and seed."""
import socket

import numpy as np
import pytest

from pretrain_helpers import metrics, pretrain


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(data, out, cache):
    return ["+experiment=tiny", f"data_paths=[{data}]", f"output_root={out}", "run_name=mp", "max_steps=6",
            f"compilation_cache_dir={cache}"]


def test_two_processes_match_one(tmp_path, tiny_sudoku, compile_cache):
    port = free_port()
    procs = [pretrain(*common(tiny_sudoku, tmp_path / "two", compile_cache),
                      f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                      f"distributed.process_id={i}", "distributed.cpu_devices_per_process=2", popen=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: after jax.distributed.initialize SIGTERM is caught
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "over 4 devices, 2 processes" in outs[0][0]
    assert "eval step" in outs[0][0] and "run dir" in outs[0][0]
    assert "eval step" not in outs[1][0] and "run dir" not in outs[1][0]  # only process 0 reports
    one = pretrain(*common(tiny_sudoku, tmp_path / "one", compile_cache), "distributed.cpu_devices_per_process=4")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "over 4 devices, 1 processes" in one.stdout

    two_rows, one_rows = metrics(tmp_path / "two" / "adhoc" / "mp"), metrics(tmp_path / "one" / "adhoc" / "mp")
    train2 = [r for r in two_rows if "train/lm_loss" in r]
    train1 = [r for r in one_rows if "train/lm_loss" in r]
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == list(range(1, 7))
    for key in ("train/lm_loss", "train/q_halt_loss", "train/accuracy", "train/count"):
        np.testing.assert_allclose([r[key] for r in train2], [r[key] for r in train1], rtol=1e-5, atol=1e-7)
    eval2 = [r for r in two_rows if "eval/all/lm_loss" in r]
    eval1 = [r for r in one_rows if "eval/all/lm_loss" in r]
    assert len(eval2) == len(eval1) >= 1
    for key in eval1[-1]:
        if key.startswith("eval/all/"):
            assert eval2[-1][key] == pytest.approx(eval1[-1][key], rel=1e-5, abs=1e-7), key
    import json
    meta = json.loads((tmp_path / "two" / "adhoc" / "mp" / "metadata.json").read_text())
    assert meta["process_count"] == 2 and len(meta["hostnames"]) == 2 and meta["device_count"] == 4
