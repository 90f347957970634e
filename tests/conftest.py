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
