"""The stub of the native module matches the built module (names, signatures, classes)."""

import subprocess
import sys

import pytest


def test_core_stub_matches_the_native_module():
    pytest.importorskip("mypy", reason="mypy not installed (pip install -e '.[test]')")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "layerswap_fast._core"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
