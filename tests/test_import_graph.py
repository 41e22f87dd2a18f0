"""The package's import graph has no cycle, counting deferred (function-level) imports too
(benchmarks/import_cycles.py prints the graph's strongly connected components)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "import_cycles.py"), str(ROOT / "edgellm")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "module-level imports: 0 cycle(s)" in r.stdout, r.stdout
    assert "module-level + function-level imports: 0 cycle(s)" in r.stdout, r.stdout


def test_a_cycle_is_found(tmp_path):
    """The script sees a circle made of a module-level and a function-level import."""
    pkg = tmp_path / "edgellm"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "kernels.py").write_text("def home():\n    from edgellm.high import prepare\n")
    (pkg / "high.py").write_text("from edgellm.low.kernels import home\n")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "import_cycles.py"), str(pkg)],
                       capture_output=True, text=True, timeout=120)
    assert "module-level imports: 0 cycle(s)" in r.stdout, r.stdout
    assert "module-level + function-level imports: 1 cycle(s)" in r.stdout, r.stdout
    assert "edgellm.high -> edgellm.low.kernels -> edgellm.high" in r.stdout, r.stdout
