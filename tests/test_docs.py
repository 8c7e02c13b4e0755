"""The documentation: the site builds with `mkdocs build --strict` (so the README's test command checks it in
CI), the README stays a front page, every relative link resolves, and the generated references name every
setting and every subcommand (docs/hooks/reference.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
README_MAX_LINES = 150
NOT_CONFIG_SECTIONS = {"Range"}  # dataclasses in illume/config.py that are not a section of the run config


@pytest.fixture(scope="module")
def hook():
    """docs/hooks/reference.py, loaded as mkdocs loads it (a file, not a package module)."""
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(hook) -> dict[str, str]:
    """Each generated page as the site shows it: its file with the marker replaced by the reference."""
    pages = {}
    for page, marker in hook.PAGES.items():
        text = (DOCS / page).read_text()
        assert marker in text, f"docs/{page} has lost its marker line {marker!r}"
        pages[page] = text.replace(marker, hook.GENERATORS[page]())
    return pages


# ------------------------------------------------------------------------------------------- the strict build
@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """Any warning fails: a broken link or anchor, a page missing from the nav, a hook that raises."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.is_file(), f"{mkdocs} is missing: install the dev extra (mkdocs-material)"
    site = tmp_path / "site"
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    # The hook ran: the references are in the built pages, not only their introductions.
    assert 'id="policy.grpo"' in (site / "reference" / "config" / "index.html").read_text()
    assert 'id="illume-annotators-revoke"' in (site / "reference" / "cli" / "index.html").read_text()


# ------------------------------------------------------------------------------------------------- the README
def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the detail into a page under docs/ and link it")


def test_the_readme_keeps_the_test_command_ci_runs():
    """.ci/run runs the line after `# 2. set up and run the tests` (grep -A1); it must be the test command."""
    lines = (REPO / "README.md").read_text().splitlines()
    index = lines.index("# 2. set up and run the tests")
    assert lines[index + 1].startswith("python3 -m venv .venv && ") and "pytest" in lines[index + 1]


# -------------------------------------------------------------------------------------------------- the links
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where Markdown links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"``.+?``|`[^`\n]+`", "", text)


def _anchors(text: str) -> set[str]:
    """The ids the headings of a page get: an explicit {#id}, else the toc extension's slug of their text."""
    from markdown.extensions.toc import slugify

    ids = set()
    for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if not match:
            continue
        heading = match.group(1)
        explicit = re.search(r"\{#([^}\s]+)\}\s*$", heading)
        if explicit:
            ids.add(explicit.group(1))
            continue
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
        ids.add(slugify(heading, "-"))
    return ids


def _pages_with_links() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", _pages_with_links(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page, generated):
    """Each link to a file of the repository names one that exists, and each #anchor into a page names one of
    its headings (the generated references' headings included). README.md's links are checked only here:
    it is not part of the site."""
    texts = {DOCS / name: text for name, text in generated.items()}
    broken = []
    for target in LINK.findall(_prose(texts.get(page, page.read_text()))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md":
            if anchor not in _anchors(texts.get(resolved, resolved.read_text())):
                broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)} has broken links: " + "; ".join(broken)


# ----------------------------------------------------------------------------------- the generated references
def _config_classes() -> list[type]:
    import illume.config

    return [cls for _, cls in inspect.getmembers(illume.config, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == illume.config.__name__
            and cls.__name__ not in NOT_CONFIG_SECTIONS]


def test_the_config_reference_names_every_field_of_every_section(generated):
    """Every dataclass of illume/config.py is a section of the page (named by its class), and each of its
    fields is a row of that section: a section or field added to the config appears, or this fails."""
    page = generated["reference/config.md"]
    sections: dict[str, set[str]] = {}
    for block in re.split(r"^## ", page, flags=re.M)[1:]:
        owner = re.search(r"^`illume\.config\.(\w+)`$", block, flags=re.M)
        assert owner, f"a section of the configuration reference names no class: {block[:80]!r}"
        keys = re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)
        sections[owner.group(1)] = {key.split(".")[-1] for key in keys}
    missing = []
    for cls in _config_classes():
        if cls.__name__ not in sections:
            missing.append(f"{cls.__name__} (no section: is it reachable from RunConfig?)")
            continue
        missing += [f"{cls.__name__}.{field.name}" for field in dataclasses.fields(cls)
                    if field.name not in sections[cls.__name__]]
    assert not missing, "the configuration reference misses " + ", ".join(missing)


def test_every_setting_has_its_doc(hook):
    """Each field that holds a value has an attribute docstring (../shared/style.md: the one place a field is
    documented), so its row in the reference says what it does. A field holding a section may go without: the
    section's class docstring stands in."""
    undocumented = []
    for cls in _config_classes():
        docs = hook.attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        undocumented += [f"{cls.__name__}.{field.name}" for field in dataclasses.fields(cls)
                         if field.name not in docs and not dataclasses.is_dataclass(hints[field.name])]
    assert not undocumented, ("config fields without an attribute docstring (a string literal right under "
                              "the field in illume/config.py): " + ", ".join(undocumented))


def test_the_cli_reference_names_every_subcommand(generated):
    """Every subcommand `illume --help` offers, nested ones included, has its heading and its help."""
    import argparse

    from illume.cli import build_parser

    def names(parser, prefix="illume"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix} {name}", sub
                    yield from names(sub, f"{prefix} {name}")

    page = generated["reference/cli.md"]
    headings = set(re.findall(r"^### (illume.*)$", page, flags=re.M))
    commands = dict(names(build_parser()))
    assert len(commands) > 10
    assert not set(commands) - headings, f"the CLI reference misses {sorted(set(commands) - headings)}"
    for name, sub in commands.items():
        assert f"usage: {sub.prog}" in page, f"the CLI reference has no usage line for {name}"
