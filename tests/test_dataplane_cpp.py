"""The data plane's C++ tests (csrc/dataplane/tests: the registration LRU, the wire format, the
endpoint protocol over cross-connected net_ring ports), built with CMake and run by ctest, so
that `pytest tests` runs them too."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "dataplane-ctest"


@pytest.mark.slow
def test_cpp_dataplane_tests_pass():
    if not shutil.which("cmake") or not shutil.which("ninja"):
        pytest.skip("needs cmake and ninja")
    with open("/tmp/genie-build.lock", "w") as lock:  # other builds share this machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja",
             "-DCMAKE_BUILD_TYPE=Release", "-DGENIE_BUILD_TESTS=ON",
             f"-DPython_EXECUTABLE={sys.executable}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
        build = subprocess.run(
            ["cmake", "--build", str(BUILD), "--target", "dataplane_tests"],
            capture_output=True,
            text=True,
        )
        assert build.returncode == 0, build.stdout[-5000:]
    run = subprocess.run(
        ["ctest", "--output-on-failure", "--timeout", "120"], cwd=BUILD, capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "tests passed" in run.stdout
