"""Every module imports on its own, and ruff's pyflakes rules (F) find nothing."""

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

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


def test_training_arguments_are_built_in_one_place():
    """Selection-SFT, DPO/KTO, the reward model and pre-training all get their HF TrainingArguments from
    `illume.training.trainer_arguments`, so a shared setting (tracker, device, DDP backend) is set once."""
    builders = [f"{path.relative_to(REPO)}:{number}"
                for package in ("illume", "reward", "policies")
                for path in sorted((REPO / package).rglob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if "TrainingArguments(" in line and not line.lstrip().startswith(("#", "def "))]
    assert len(builders) == 1 and builders[0].startswith("illume/training.py:"), builders


def test_nothing_outside_the_backends_asks_which_backend_it_has():
    """What differs between backends lives behind the VLM protocol (illume.models.vlm): outside illume/models/,
    no code compares a backend name or keeps an is-HF flag."""
    asking = [f"{path.relative_to(REPO)}:{number}"
              for package in ("illume", "reward", "policies")
              for path in sorted((REPO / package).rglob("*.py"))
              if path.relative_to(REPO).parts[:2] != ("illume", "models")
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"backend ==|is_hf|\.backend\b", line)]
    assert not asking, asking


def test_import_contracts_hold():
    """The architecture contracts in pyproject.toml ([tool.importlinter]), checked by import-linter."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.is_file():
        pytest.skip("import-linter is not installed (it comes with the dev extra)")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
