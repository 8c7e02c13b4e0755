"""Every module imports on its own; ruff (pyproject.toml's rules, the private-import rule included) and the
import contracts find nothing, and each guard catches a planted violation."""

import ast
import importlib
import importlib.util
import os
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


def _ruff(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")  # a failure under CI=true (conftest)
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd, capture_output=True,
                          text=True)


def test_ruff_finds_nothing():
    """pyproject.toml's rules: pyflakes (F), syntax (E9), import order (I) and no import of another module's
    private names (PLC2701)."""
    result = _ruff("illume", "reward", "policies", "scripts", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_private_import_rule_catches_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from illume.sampling import _clean\n\nprint(_clean)\n")
    result = _ruff("--output-format", "concise", "--config", str(REPO / "pyproject.toml"), str(planted))
    assert result.returncode == 1 and "import-private-name" in result.stdout, result.stdout + result.stderr


def test_training_arguments_are_built_in_one_place():
    """Selection-SFT, DPO/KTO, the reward model and pre-training all get their HF TrainingArguments from
    `illume.training.trainer_arguments`, so a shared setting (tracker, device, DDP backend) is set once."""
    builders = [f"{path.relative_to(REPO)}:{number}"
                for package in ("illume", "reward", "policies")
                for path in sorted((REPO / package).rglob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if "TrainingArguments(" in line and not line.lstrip().startswith(("#", "def "))]
    assert len(builders) == 1 and builders[0].startswith("illume/training.py:"), builders


BACKEND_MODULES = ("illume.models.hf", "illume.models.magma", "illume.models.word_tokenizer")
"""The backends' own modules (prefixes: magma_checkpoint, magma_decoding, ...); illume.models.vlm's protocol,
illume.models.loading and illume.models.export are what the rest of the code uses instead."""
BACKEND_CLASSES = {"HFVLM", "MagmaVLM", "MagmaForCausalLM"}

BACKEND_SPECIFIC = {
    ("illume/config.py", "compares model.kind"): "the schema: which prompt formats a model kind has",
    ("illume/demo/", ""): "builds and pre-trains the demo base model of each backend",
    ("illume/plan.py", ""): "walks MAGMA's architecture; other kinds are refused",
    ("illume/cli.py", "imports illume.models.magma_checkpoint"): "registers `illume convert-magma`",
    ("policies/grpo.py", ""): "GRPO_TRAINERS: the one place GRPO's trainer is chosen per model.kind",
    ("policies/grpo_trl.py", "imports illume.models.hf"): "TRL's GRPOTrainer, for HF VLMs only",
    ("illume/vllm_engine.py", "imports illume.models.hf"): "vLLM serves HF checkpoints with PEFT LoRA: the "
                                                            "engine is for model.kind=hf only",
}
"""Code outside illume/models/ that is about one backend by its purpose: (path or folder, the question it may
ask, "" for any) -> why. Everywhere else the backends differ only behind the VLM protocol."""


def _is_model_kind(node: ast.AST) -> bool:
    """`<...>.model.kind` or `model_cfg.kind`: the configured backend."""
    if not (isinstance(node, ast.Attribute) and node.attr == "kind"):
        return False
    owner = node.value
    return (isinstance(owner, ast.Attribute) and owner.attr == "model") or (
        isinstance(owner, ast.Name) and owner.id in ("model", "model_cfg"))


def backend_questions(source: str) -> list[tuple[int, str]]:
    """Where `source` asks which backend it has: imports a backend's module or class, checks isinstance
    against a backend class, compares model.kind, looks something up by it, or reads `.backend` / `is_hf`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [alias.name for alias in node.names]
            if node.module.startswith(BACKEND_MODULES) or BACKEND_CLASSES & set(names):
                found.append((node.lineno, f"imports {node.module}: {', '.join(names)}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {alias.name}") for alias in node.names
                      if alias.name.startswith(BACKEND_MODULES)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            if len(node.args) == 2 and any(isinstance(n, ast.Name) and n.id in BACKEND_CLASSES
                                           for n in ast.walk(node.args[1])):
                found.append((node.lineno, "isinstance of a backend class"))
        elif isinstance(node, ast.Compare) and any(map(_is_model_kind, [node.left, *node.comparators])):
            found.append((node.lineno, "compares model.kind"))
        elif isinstance(node, ast.Subscript) and _is_model_kind(node.slice):
            found.append((node.lineno, "looks up by model.kind"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and _is_model_kind(node.args[0])):
            found.append((node.lineno, "looks up by model.kind"))
        elif isinstance(node, ast.Attribute) and node.attr in ("backend", "is_hf"):
            found.append((node.lineno, f"reads .{node.attr}"))
        elif isinstance(node, ast.Name) and node.id == "is_hf":
            found.append((node.lineno, "reads is_hf"))
    return sorted(found)


def _allowed(path: str, question: str) -> bool:
    return any(path.startswith(where) and question.startswith(what) for where, what in BACKEND_SPECIFIC)


def _backend_questions_in_the_code() -> dict[str, list[tuple[int, str]]]:
    return {str(path.relative_to(REPO)): questions
            for package in ("illume", "reward", "policies")
            for path in sorted((REPO / package).rglob("*.py"))
            if path.relative_to(REPO).parts[:2] != ("illume", "models")
            if (questions := backend_questions(path.read_text()))}


def test_nothing_outside_the_backends_asks_which_backend_it_has():
    """What differs between backends lives behind the VLM protocol (illume.models.vlm) and is chosen inside
    illume/models/ (loading, export); outside it only the modules of BACKEND_SPECIFIC ask, each for its reason,
    and each of those entries is still needed."""
    found = _backend_questions_in_the_code()
    asking = [f"{path}:{line}: {question}" for path, questions in found.items() for line, question in questions
              if not _allowed(path, question)]
    assert not asking, asking
    used = {(where, what) for where, what in BACKEND_SPECIFIC for path, questions in found.items()
            if path.startswith(where) and any(question.startswith(what) for _, question in questions)}
    assert used == set(BACKEND_SPECIFIC), f"entries no code needs any more: {set(BACKEND_SPECIFIC) - used}"


@pytest.mark.parametrize("planted, question", [
    ("from illume.models.vlm import MagmaVLM\n", "imports illume.models.vlm: MagmaVLM"),
    ("from illume.models.hf import HFVLM\n", "imports illume.models.hf: HFVLM"),
    ("import illume.models.magma_decoding\n", "imports illume.models.magma_decoding"),
    ("if isinstance(vlm, (MagmaVLM, int)):\n    pass\n", "isinstance of a backend class"),
    ("if cfg.model.kind == 'hf':\n    pass\n", "compares model.kind"),
    ("ok = cfg.model.kind in ('hf',)\n", "compares model.kind"),
    ("run = TRAINERS[cfg.model.kind]\n", "looks up by model.kind"),
    ("run = TRAINERS.get(context.cfg.model.kind)\n", "looks up by model.kind"),
    ("flag = vlm.backend\n", "reads .backend"),
])
def test_the_backend_guard_catches_a_planted_question(planted, question):
    assert [q for _, q in backend_questions(planted)] == [question]
    assert not _allowed("reward/train.py", question)


def test_the_backend_guard_lets_labels_and_the_protocol_through():
    assert backend_questions("from illume.models.vlm import VLM\nlabel = f'{cfg.model.kind}:{path}'\n"
                             "record = {'model_kind': cfg.model.kind}\n") == []


def _store_private_names() -> set[str]:
    """FeedbackStore's private attributes and methods (`self._engine`, `_read`, ...), read from
    illume/feedback/store.py."""
    tree = ast.parse((REPO / "illume" / "feedback" / "store.py").read_text())
    store = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FeedbackStore")
    names = {node.name for node in store.body if isinstance(node, ast.FunctionDef) and node.name.startswith("_")
             and not node.name.startswith("__")}
    names |= {node.attr for node in ast.walk(store) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr.startswith("_")}
    return names


SESSION_ACCESSORS = {"read_sessions", "write_sessions"}
"""The store's session factories: for the feedback package's own queries and writes only."""


def store_boundary_crossings(source: str, in_feedback_package: bool) -> list[tuple[int, str]]:
    """Where `source` uses a private name of the store on anything but `self`, or (outside illume/feedback/)
    the store's session factories or a private name of one of the package's modules (`illume.feedback.x._y`)."""
    private = _store_private_names()
    found = []
    for node in ast.walk(ast.parse(source)):
        if (not in_feedback_package and isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("illume.feedback")):
            found += [(node.lineno, f"imports {node.module}.{alias.name} outside illume/feedback/")
                      for alias in node.names if alias.name.startswith("_")]
            continue
        if (not in_feedback_package and isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and ast.unparse(node.value).startswith("illume.feedback")):
            found.append((node.lineno, f"uses {ast.unparse(node)} outside illume/feedback/"))
            continue
        if not isinstance(node, ast.Attribute) or (isinstance(node.value, ast.Name) and node.value.id == "self"):
            continue
        if node.attr in private:
            found.append((node.lineno, f"uses the store's private .{node.attr}"))
        elif node.attr in SESSION_ACCESSORS and not in_feedback_package:
            found.append((node.lineno, f"uses .{node.attr} outside illume/feedback/"))
    return sorted(found)


@pytest.mark.slow
def test_nothing_outside_the_store_uses_its_private_names():
    crossings = [f"{path.relative_to(REPO)}:{line}: {what}"
                 for package in ("illume", "reward", "policies", "scripts")
                 for path in sorted((REPO / package).rglob("*.py")) if path != REPO / "illume" / "feedback" / "store.py"
                 for line, what in store_boundary_crossings(
                     path.read_text(), path.relative_to(REPO).parts[:2] == ("illume", "feedback"))]
    assert not crossings, crossings


@pytest.mark.parametrize("planted, in_feedback, what", [
    ("with store._read() as session:\n    pass\n", True, "uses the store's private ._read"),
    ("engine = run.store._engine\n", False, "uses the store's private ._engine"),
    ("store._write.begin()\n", True, "uses the store's private ._write"),
    ("with store.write_sessions.begin() as s:\n    pass\n", False, "uses .write_sessions outside illume/feedback/"),
    ("from illume.feedback.writes import _check_split\n", False,
     "imports illume.feedback.writes._check_split outside illume/feedback/"),
    ("import illume.feedback.reads\nillume.feedback.reads._gc_paused()\n", False,
     "uses illume.feedback.reads._gc_paused outside illume/feedback/"),
])
def test_the_store_guard_catches_a_planted_crossing(planted, in_feedback, what):
    assert [w for _, w in store_boundary_crossings(planted, in_feedback)] == [what]


def test_the_store_guard_lets_the_package_and_self_through():
    assert store_boundary_crossings("with store.read_sessions() as s:\n    self._read()\n", True) == []
    assert store_boundary_crossings("from illume.feedback.writes import _check_split\n", True) == []
    assert {"_engine", "_read", "_write"} <= _store_private_names()


def test_import_contracts_hold():
    """The architecture contracts in pyproject.toml ([tool.importlinter]), checked by import-linter."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.is_file():
        pytest.skip("import-linter is not installed (it comes with the dev extra)")  # fails under CI=true
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_layer_is_a_catch_all():
    """Each layer's modules are independent ("|"); a ":"-joined layer would let them import each other in any
    direction, which is what the layers are there to rule out."""
    tomllib = pytest.importorskip("tomllib")
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = [layer for contract in contracts if contract["type"] == "layers" for layer in contract["layers"]]
    assert layers and not [layer for layer in layers if ":" in layer]


@pytest.mark.parametrize("ci, outcome", [("true", "1 failed"), ("", "1 skipped")])
def test_a_skip_fails_under_ci(tmp_path, ci, outcome):
    """A test that skips for a missing tool (here: a planted one) fails under CI=true (tests/conftest.py)."""
    planted = tmp_path / "test_planted.py"
    planted.write_text("import pytest\n\n\ndef test_needs_a_tool():\n    pytest.skip('the tool is not installed')\n")
    env = {**os.environ, "CI": ci}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
                             "-c", os.devnull, str(planted)], cwd=REPO, env=env, capture_output=True, text=True)
    assert outcome in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("skipped under CI=true" in result.stdout) == bool(ci)
