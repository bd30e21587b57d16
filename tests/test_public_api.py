"""Code outside the core (nodes/, bench/, tools/, the package root) uses only the core's public
names: no ``from alignprop_core... import _name`` and no ``module._name`` on a core module.

Private names may change with any refactor of the core; whatever the nodes and benchmarks need is
made public there instead. Read with ``ast``, so nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "alignprop_core"
OUTSIDE = ("nodes", "bench", "tools")


def _private(name: str) -> bool:
    """``_x`` is private; dunders (``__version__``, ``__file__``) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The dotted module an ``ImportFrom`` reads, relative imports resolved against ``package``
    (the importing file's package, dotted from the repository root; "" for the root itself)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".") if package else []
    base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*base, node.module] if node.module else base)


def _in_core(module: str) -> bool:
    return module == CORE or module.startswith(CORE + ".")


def private_uses(source: str, package: str = "", filename: str = "<source>") -> list[str]:
    """Every use of a private core name in ``source``, as ``"file:line: what"``.

    Args:
        source: Python source text.
        package: the dotted package the file sits in, from the repository root ("" for the root),
            to resolve relative imports.
        filename: for the messages.
    """
    tree = ast.parse(source, filename)
    found: list[str] = []
    core_names: set[str] = set()  # local names bound to core modules or objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _in_core(alias.name):
                    parts = alias.name.split(".")
                    if any(_private(p) for p in parts):
                        found.append(f"{filename}:{node.lineno}: import {alias.name}")
                    core_names.add(alias.asname or parts[0])
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            if not _in_core(module):
                continue
            if any(_private(p) for p in module.split(".")):
                found.append(f"{filename}:{node.lineno}: from {module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{filename}:{node.lineno}: from {module} import {alias.name}")
                core_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in core_names:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in core_names
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def _outside_files() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for folder in OUTSIDE:
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def test_the_checker_finds_private_uses_and_passes_public_ones():
    bad = "\n".join([
        "from alignprop_core.training.trainer import _optimizer_step, train",
        "from alignprop_core.training import trainer",
        "import alignprop_core.lora.file as lora_file",
        "import alignprop_core",
        "from ..alignprop_core.lora import _hidden",
        "trainer._draw(1)",
        "lora_file._check_path('x')",
        "alignprop_core.lora.keys._split_key('k')",
        "getattr(trainer, '_optimizer_step')",
        "from alignprop_core.lora._private import thing",
    ])
    found = private_uses(bad, package="nodes", filename="bad.py")
    for what in ("import _optimizer_step", "from alignprop_core.lora import _hidden", "trainer._draw",
                 "lora_file._check_path", "alignprop_core.lora.keys._split_key",
                 "getattr(trainer, '_optimizer_step')", "from alignprop_core.lora._private import"):
        assert any(what in line for line in found), (what, found)
    assert len(found) == 7, found
    good = "\n".join([
        "from alignprop_core.lora import save_lora, __all__",
        "import alignprop_core",
        "from .paths import _local",  # nodes' own private helper
        "import torch",
        "torch._C",  # not a core module
        "print(alignprop_core.__version__, save_lora.__doc__)",
        "self._cache = {}",
    ])
    assert private_uses(good, package="nodes", filename="good.py") == []


def test_nothing_outside_the_core_uses_a_private_core_name():
    files = _outside_files()
    assert any(f.parent.name == "nodes" for f in files) and any(f.parent.name == "bench" for f in files)
    found = []
    for path in files:
        rel = path.relative_to(ROOT)
        package = ".".join(rel.parent.parts)
        found += private_uses(path.read_text(encoding="utf-8"), package, str(rel))
    assert not found, "private core names used outside the core (make them public there):\n" + "\n".join(found)
