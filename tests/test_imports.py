"""Every module imports on its own, and ruff's pyflakes rules (F) find nothing."""

import importlib
import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for package in ("illume", "reward", "policies")
    for path in (REPO / package).rglob("*.py")
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "illume", "reward", "policies", "scripts", "tests"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
