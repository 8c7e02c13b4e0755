"""mkdocs hook: the configuration and CLI references, generated from the code at every `mkdocs build`.

docs/reference/config.md and docs/reference/cli.md hold an introduction and a marker line; this hook replaces
the marker with the reference, so nothing generated is committed and the pages cannot fall behind the code:

- the configuration reference walks `illume.config.RunConfig` section by section: each field's dotted key, its
  type, its default (as YAML writes it), its allowed range (the class's `RANGES`) and its attribute docstring
  (the string literal under the field: the one place a field is documented, ../shared/style.md);
- the CLI reference renders `illume.cli.build_parser()`: the command's own help, then every subcommand's
  (`annotators add`, ... included) as argparse prints it.

tests/test_docs.py imports this file to check that every field and every subcommand is named.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import json
import os
import typing
from collections.abc import Iterator
from pathlib import Path

CONFIG_MARKER = "<!-- generated: configuration reference -->"
CLI_MARKER = "<!-- generated: CLI reference -->"
PAGES = {"reference/config.md": CONFIG_MARKER, "reference/cli.md": CLI_MARKER}


# ---------------------------------------------------------------------------------------------- configuration
class Row(typing.NamedTuple):
    key: str  # dotted, as an override writes it: "data.hf.columns.image"
    type: str  # as the annotation is written
    default: str  # Markdown: a YAML value in a code span, or a link to the section it holds
    allowed: str  # the range checked at load ("" when none)
    doc: str


class Section(typing.NamedTuple):
    key: str  # "data.hf.columns"; "" for the top level; "sample.pool[]" for each entry of a list
    cls: type
    rows: list[Row]


def attribute_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring: the string literal right under `name: type = default` in `cls`."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _section_class(annotation: typing.Any) -> tuple[type | None, str]:
    """The config class a field holds and how: "section" (nested), "optional" (a section or None) or "list"
    (a list of sections); (None, "") for a plain value."""
    if dataclasses.is_dataclass(annotation):
        return annotation, "section"
    classes = [arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)]
    if not classes:
        return None, ""
    return classes[0], ("list" if typing.get_origin(annotation) is list else "optional")


def _yaml(field: dataclasses.Field) -> str:
    """The default as a YAML config writes it (null, true, [0.3, 0.8], {"a": 1.0}), in a code span."""
    value = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _anchor(key: str) -> str:
    """The id of a section's heading: its dotted key (`sample.pool[]`: `sample.pool`), else "top-level"."""
    return key.removesuffix("[]") or "top-level"


def _summary(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]


def config_sections() -> list[Section]:
    """Every section of the run config, top level first, then depth first in field order. A class held in
    several places (ModelConfig: model, judge.model, sample.pool[].model) is a section once, at the first."""
    from illume.config import RunConfig

    sections: list[Section] = []
    seen: dict[type, str] = {}

    def visit(cls: type, key: str) -> None:
        seen[cls] = key
        hints, docs, ranges = typing.get_type_hints(cls), attribute_docs(cls), getattr(cls, "RANGES", {})
        section, nested = Section(key, cls, []), []
        sections.append(section)
        for field in dataclasses.fields(cls):
            dotted = f"{key}.{field.name}" if key else field.name
            inner, how = _section_class(hints[field.name])
            doc, default = docs.get(field.name, ""), _yaml(field) if how != "section" else ""
            if how == "section":
                default = f"section [`{dotted}`](#{_anchor(dotted)})"
                doc = doc or _summary(inner)  # a section's field may go without a docstring: its class has it
                nested.append((inner, dotted))
            elif how == "list":
                doc += f" Each entry: [`{dotted}[]`](#{_anchor(dotted)})."
                nested.append((inner, dotted + "[]"))
            elif how == "optional" and inner in seen:
                doc += f" Its keys are those of [`{seen[inner]}`](#{_anchor(seen[inner])})."
            elif how == "optional":
                nested.append((inner, dotted))
            allowed = str(ranges[field.name]) if field.name in ranges else ""
            section.rows.append(Row(dotted, str(field.type), default, allowed, doc))
        for inner, dotted in nested:
            if inner not in seen:
                visit(inner, dotted)

    visit(RunConfig, "")
    return sections


def _cell(text: str) -> str:
    """Text on one line for a table cell: "|" escaped outside code spans (inside them the table keeps it)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def config_reference() -> str:
    """The configuration reference as Markdown: one heading and one table per section."""
    out = []
    for section in config_sections():
        heading = section.key or "top level"
        intro = _cell(inspect.cleandoc(section.cls.__doc__ or ""))
        out += [f"## {heading} {{#{_anchor(section.key)}}}", "", intro, "",
                f"`{section.cls.__module__}.{section.cls.__name__}`", "",
                "| key | type | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
        out += [f"| `{row.key}` | `{row.type}` | {row.default} | {_cell(row.allowed)} | {_cell(row.doc)} |"
                for row in section.rows]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- the CLI
def subcommands(parser=None, prefix: str = "illume") -> Iterator[tuple[str, typing.Any, str]]:
    """("illume run", its parser, its one-line help), ... for every subcommand, nested ones included
    (`illume annotators add`), in the order `illume --help` lists them."""
    import argparse

    if parser is None:
        from illume.cli import build_parser

        parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub, helps.get(name, "")
                yield from subcommands(sub, f"{prefix} {name}")


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps its help to the terminal's width: fix it, so the page is the same on every machine."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def cli_reference() -> str:
    """The CLI reference as Markdown: `illume --help`, then each subcommand's help, as argparse prints it."""
    from illume.cli import build_parser

    with _columns(110):
        parser = build_parser()
        out = ["### illume", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub, help_text in subcommands(parser):
            out += [f"### {name}", "", f"{help_text[:1].upper()}{help_text[1:]}.", "",
                    "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


GENERATORS = {"reference/config.md": config_reference, "reference/cli.md": cli_reference}


# ------------------------------------------------------------------------------------------------ mkdocs hook
def on_page_markdown(markdown: str, page, config, files) -> str:
    uri = Path(page.file.src_uri).as_posix()
    if uri not in PAGES:
        return markdown
    if PAGES[uri] not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{uri} has lost its marker line {PAGES[uri]!r}: no place for the reference")
    return markdown.replace(PAGES[uri], GENERATORS[uri]())
