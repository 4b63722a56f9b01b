"""Imports point one way: the applications (`p2pswarm.apps`, `tui`, `bootstrap`) import the library, never
the reverse; inside the library, the transports don't import the game loop and the GRPO maths doesn't
import settings.

The check reads every module's AST, so it sees what a grep or a plain import would miss: imports inside
functions and under `if TYPE_CHECKING:`, relative imports, and `importlib.import_module("...")` /
`__import__("...")` with a literal name. A failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2pswarm", "tui", "bootstrap")


@dataclass(frozen=True)
class Module:
    name: str  # dotted: p2pswarm.comm.folder
    path: str  # as a failure shows it: p2pswarm/comm/folder.py
    source: str
    is_package: bool = False


@dataclass(frozen=True)
class Rule:
    applies: Callable[[str], bool]  # to the importing module, by dotted name
    forbidden: tuple[str, ...]  # modules (and everything under them) it may not import
    why: str


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def in_library(name: str) -> bool:
    return under(name, "p2pswarm") and not under(name, "p2pswarm.apps", "p2pswarm.__main__")


RULES = {
    "library-imports-no-app": Rule(in_library, ("tui", "bootstrap", "p2pswarm.apps"),
                                   "the library imports no application; p2pswarm.apps, tui and bootstrap import it"),
    "comm-imports-no-game": Rule(lambda n: under(n, "p2pswarm.comm"), ("p2pswarm.game",),
                                 "transports serve the round loop; they don't import it"),
    "grpo-imports-no-settings": Rule(lambda n: n == "p2pswarm.grpo", ("p2pswarm.settings",),
                                     "the GRPO maths takes numbers, not the settings object"),
    "apps-import-no-cli-layer": Rule(lambda n: under(n, "tui", "bootstrap"), ("p2pswarm.apps",),
                                     "tui and bootstrap sit beside p2pswarm.apps, not on top of it"),
}


def imports(module: Module) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import in the module, at any depth. `from a import b` yields `a` and
    `a.b` (b may be a submodule); relative imports are resolved against the module's package."""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    for node in ast.walk(ast.parse(module.source, module.path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if node.module:
                yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def violations(modules: list[Module], rule: Rule) -> list[str]:
    """One "path:line: module imports target (why)" per offending line, in file and line order."""
    hits: dict[tuple[str, int], str] = {}
    for m in modules:
        if rule.applies(m.name):
            for line, target in imports(m):
                if under(target, *rule.forbidden):
                    hits.setdefault((m.path, line), f"{m.path}:{line}: {m.name} imports {target} ({rule.why})")
    return [hits[k] for k in sorted(hits)]


def project_modules() -> list[Module]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found.append(Module(".".join(parts), str(rel), path.read_text(), is_package))
    return found


@pytest.mark.parametrize("rule_id", list(RULES))
def test_imports_point_one_way(rule_id):
    modules = project_modules()
    assert any(m.name == "p2pswarm.apps.cli" for m in modules) and any(m.name == "tui.engine" for m in modules)
    found = violations(modules, RULES[rule_id])
    assert not found, "\n".join(found)


def test_the_check_sees_imports_in_functions_relative_and_dynamic():
    """The walker can fail: every spelling of a forbidden import in a synthetic module is reported, with its
    line; allowed look-alikes (a library module named `bootstrap`, `textual`, `tuition`) are not."""
    source = (
        "import textual\n"                                          # 1: not `tui`
        "from p2pswarm.comm.hivemind import bootstrap\n"            # 2: the library's own module
        "def f():\n"
        "    from tui import SwarmApp\n"                            # 4
        "    import bootstrap.cli\n"                                # 5
        "    import tuition\n"                                      # 6: not `tui`
        "    return importlib.import_module('p2pswarm.apps.cli')\n"  # 7
        "if TYPE_CHECKING:\n"
        "    from ..apps import cli\n"                              # 9: p2pswarm.apps.cli from p2pswarm.comm.x
        "__import__('tui.engine')\n"                                # 10
        "from . import bootstrap\n"                                 # 11: p2pswarm.comm.bootstrap, allowed
    )
    mod = Module("p2pswarm.comm.x", "p2pswarm/comm/x.py", source)
    found = violations([mod], RULES["library-imports-no-app"])
    assert [v.split(" (")[0] for v in found] == [
        "p2pswarm/comm/x.py:4: p2pswarm.comm.x imports tui",
        "p2pswarm/comm/x.py:5: p2pswarm.comm.x imports bootstrap.cli",
        "p2pswarm/comm/x.py:7: p2pswarm.comm.x imports p2pswarm.apps.cli",
        "p2pswarm/comm/x.py:9: p2pswarm.comm.x imports p2pswarm.apps",
        "p2pswarm/comm/x.py:10: p2pswarm.comm.x imports tui.engine",
    ], found
    # The same module inside the app layer may import all of them.
    assert violations([Module("p2pswarm.apps.x", "p2pswarm/apps/x.py", source)], RULES["library-imports-no-app"]) == []
    # A relative import from a package's __init__ resolves against the package itself.
    init = Module("p2pswarm.comm", "p2pswarm/comm/__init__.py", "from ..game import GameManager\n", is_package=True)
    assert violations([init], RULES["comm-imports-no-game"]) == [
        "p2pswarm/comm/__init__.py:1: p2pswarm.comm imports p2pswarm.game "
        f"({RULES['comm-imports-no-game'].why})"]
