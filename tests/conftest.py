"""Test setup: 8 host CPU devices for JAX, set before jax is imported anywhere."""
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "reference_trm"


@pytest.fixture
def fixture_paths():
    return sorted(FIXTURES.glob("*.npz"))


@pytest.fixture
def kellen_cmd():
    """The installed console script, run as a real subprocess."""
    return [str(pathlib.Path(sys.executable).with_name("kellen"))]


# --------------------------------------------------------------------------- GCS emulator
GCS_TEST_BUCKET = "kellen-test"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A patched gcp-storage-emulator (tests/gcs_emulator.py) on a loopback port, with bucket
    ``kellen-test``, and the env vars that point google-cloud-storage, gcsfs and tensorstore
    (so Orbax) at it set for the session. Yields ``.url``, ``.bucket``, ``.env``."""
    pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator")
    pytest.importorskip("google.cloud.storage", reason="needs google-cloud-storage")
    import types

    from gcs_emulator import start_emulator

    emu = start_emulator(tmp_path_factory.mktemp("gcs_emulator"))
    saved_env = {k: os.environ.get(k) for k in emu.env}
    saved_fsspec = None
    try:
        emu.create_bucket(GCS_TEST_BUCKET)
        os.environ.update(emu.env)
        try:  # fsspec reads FSSPEC_GCS_TOKEN only when first imported: set its config too
            import fsspec.config

            saved_fsspec = {p: fsspec.config.conf.get(p) for p in ("gs", "gcs")}
            for p in saved_fsspec:
                fsspec.config.conf[p] = {**(saved_fsspec[p] or {}), "token": "anon"}
        except ImportError:
            pass
        yield types.SimpleNamespace(url=emu.url, bucket=GCS_TEST_BUCKET, env=dict(emu.env), emulator=emu)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_fsspec is not None:
            import fsspec.config

            for p, v in saved_fsspec.items():
                if v is None:
                    fsspec.config.conf.pop(p, None)
                else:
                    fsspec.config.conf[p] = v
        emu.stop()  # SIGKILL to its process group


@pytest.fixture
def gcs_prefix(gcs_emulator):
    """A fresh ``gs://kellen-test/<uuid>/`` for one test."""
    import uuid

    return f"gs://{gcs_emulator.bucket}/{uuid.uuid4().hex}/"


@pytest.fixture(scope="session")
def tiny_sudoku(tmp_path_factory):
    """A small generated Sudoku dataset, built once per session through the real CLI."""
    import subprocess

    root = tmp_path_factory.mktemp("data") / "tiny-sudoku"
    kellen = str(pathlib.Path(sys.executable).with_name("kellen"))
    subprocess.run([kellen, "data", "sudoku", "--out", str(root), "--generate", "64", "--test-generate", "24",
                    "--min-clues", "50", "--seed", "1"], check=True, capture_output=True, timeout=300)
    return str(root)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the session's training subprocesses."""
    return str(tmp_path_factory.mktemp("jax-cache"))


# --------------------------------------------------------------------------- fault-injection suite report
# Tests marked @pytest.mark.fault(N, "what is checked") are the scenarios of the fault-injection suite
# (`make faults` runs only them). At the end of any session that ran some, a table lists each
# scenario, what was checked, the result and the time, and marks the slowest ones.
SLOW_SCENARIO_SECONDS = 60.0
_FAULT_RESULTS = []


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(n, checked): scenario n of the fault-injection suite")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None:
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        n, checked = marker.args[0], marker.args[1]
        _FAULT_RESULTS.append((n, checked, item.name, rep.outcome, getattr(rep, "duration", 0.0)))


def pytest_terminal_summary(terminalreporter):
    if not _FAULT_RESULTS:
        return
    # One row per (scenario, check); parametrized cases are counted, their times summed.
    rows = {}
    for n, checked, name, result, seconds in _FAULT_RESULTS:
        row = rows.setdefault((n, checked), {"passed": 0, "total": 0, "seconds": 0.0, "failed": []})
        row["total"] += 1
        row["seconds"] += seconds
        if result == "passed":
            row["passed"] += 1
        else:
            row["failed"].append(f"{name} {result}")
    tr = terminalreporter
    tr.section("fault-injection suite")
    width = max(len(c) for _, c in rows)
    tr.write_line(f"{'#':>3}  {'checked':<{width}}  {'result':<12}  {'time':>7}")
    for (n, checked), r in sorted(rows.items(), key=lambda kv: kv[0][0]):
        result = ("passed" if r["passed"] == r["total"] else "FAILED") + (f" {r['passed']}/{r['total']}" if r["total"] > 1 else "")
        slow = "  (slow)" if r["seconds"] >= SLOW_SCENARIO_SECONDS else ""
        tr.write_line(f"{n:>3}  {checked:<{width}}  {result:<12}  {r['seconds']:6.1f}s{slow}")
        for f in r["failed"]:
            tr.write_line(f"{'':>5}{f}")
    ok = sum(r["passed"] == r["total"] for r in rows.values())
    tr.write_line(f"{ok} of {len(rows)} checks passed, covering scenarios {sorted({n for n, _ in rows})}")
