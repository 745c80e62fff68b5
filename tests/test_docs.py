"""The docs say what the code does: the README's preset table is the code's, and every module path
the design notes name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "gradleak"


def test_the_readme_preset_table_is_the_code_s() -> None:
    from gradleak.experiments.reference import preset_table

    assert preset_table() in (ROOT / "README.md").read_text()


def test_every_module_the_design_notes_name_exists() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    named = set(re.findall(r"`([a-z_/]+(?:\.py|/))`", text))
    assert len(named) > 30
    missing = [p for p in sorted(named) if not (SRC / p).exists()]
    assert not missing, missing


def test_the_readme_layout_lists_every_package() -> None:
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    packages = [p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert packages and all(f"  {name}/" in layout for name in packages), packages


def test_the_code_is_formatted_and_lint_clean() -> None:
    """The formatter settles the layout of every file (no line-by-line opt-outs), and the linter
    finds nothing (pyflakes, pycodestyle, import order)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = [str(ROOT / p) for p in ("src", "tests", "benchmarks")]
    fmt = subprocess.run(
        [ruff, "format", "--check", *paths], capture_output=True, text=True, cwd=ROOT
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run([ruff, "check", *paths], capture_output=True, text=True, cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    skips = [
        p
        for d in ("src", "tests", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
        if "fmt" + ": skip" in p.read_text()
    ]
    assert not skips, skips


def test_every_benchmark_imports_against_the_current_package() -> None:
    # A benchmark is run by hand, not by the suite: an import it still names after a refactor
    # would go unnoticed until someone reproduces a figure. Import them all in one fresh process.
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert {"attacks", "exact", "text", "cases"} <= set(names)
    done = subprocess.run(
        [sys.executable, "-c", "; ".join(f"import {n}" for n in names)],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
