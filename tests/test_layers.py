"""The import layers of DESIGN.md ("lower layers never import higher ones") and no cycles between
sibling modules: import-linter checks the contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "tests/test_layers.py needs the dev extra: pip install -e '.[dev]'"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)  # reads ROOT/pyproject.toml
    report = result.stdout + result.stderr
    broken = report[report.find("Broken contracts"):] if "Broken contracts" in report else report
    assert result.returncode == 0, f"an import contract is broken:\n{broken}"
