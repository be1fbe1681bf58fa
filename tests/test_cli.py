"""The `concilium` entry point itself."""

from __future__ import annotations

import subprocess
import sys

from concilium import __version__
from tests.support import ROOT


def test_version_flag_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"concilium {__version__}"
