"""constraints.txt, the lock the README's commands and CI install from, against pyproject.toml and the
environment the tests run in."""

import os
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_direct_dependency_is_locked_inside_its_range_with_an_upper_bound():
    pins = _lock()
    for requirement in _direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in constraints.txt: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
        assert any(s.operator in ("<", "<=", "==") for s in requirement.specifier), \
            f"{requirement} has no upper bound: cap it at the next release after the locked one"


@pytest.mark.skipif(os.environ.get("ILLUME_UNLOCKED") == "1", reason="ILLUME_UNLOCKED=1: testing newer releases")
def test_the_tests_run_on_the_locked_versions():
    """What the README's test command installs is what the lock says (local labels such as +cpu aside)."""
    wrong = []
    for name, pinned in _lock().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:  # a platform-only package (e.g. for Windows) or not needed here
            continue
        if installed.public != pinned.public:
            wrong.append(f"{name} {installed} (lock: {pinned})")
    assert not wrong, ("installed versions differ from constraints.txt (install with -c constraints.txt, or set "
                       f"ILLUME_UNLOCKED=1 to test other releases): {', '.join(wrong)}")
