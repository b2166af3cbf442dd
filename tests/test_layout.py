"""The package's layering, as docs/architecture.md states it: imports only run down the pipeline.

Read from the source with `ast` (every import, including the ones inside functions), so a new
module is checked the moment it exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "tcprio"
ARCHITECTURE = PACKAGE.parent.parent / "docs" / "architecture.md"

# Shared leaves: plain data and input handling, importable from every layer.
LEAVES = {"tcprio.model", "tcprio.inputs"}

# What each folder may import from tcprio (besides itself and the leaves).
ALLOWED: dict[str, set[str]] = {
    "tcprio.kernel": set(),
    "tcprio.analysis": set(),
    "tcprio.service": {"tcprio.kernel", "tcprio.analysis", "tcprio.scan", "tcprio.datadog"},
    "tcprio.selftest": {
        "tcprio.kernel",
        "tcprio.analysis",
        "tcprio.scan",
        "tcprio.datadog",
        "tcprio.service.config",
        "tcprio.service.live_probe",
    },
    "tcprio.bundle": {
        "tcprio.kernel",
        "tcprio.analysis",
        "tcprio.scan",
        "tcprio.report",
        "tcprio.datadog",
        "tcprio.service.config",
    },
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tcprio_imports(path: Path) -> set[str]:
    """Every `tcprio...` module a file imports (`from tcprio import x` counts `tcprio.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tcprio"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tcprio":
                found.update(f"tcprio.{a.name}" for a in node.names if a.name != "__version__")
            elif node.module.startswith("tcprio."):
                found.add(node.module)
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_known_place() -> None:
    top_level = {module_name(p) for p in MODULES if p.parent == PACKAGE}
    assert top_level <= {
        "tcprio",
        "tcprio.__main__",
        "tcprio.cli",
        "tcprio.scan",
        "tcprio.datadog",
        "tcprio.report",
        *LEAVES,
    }, "a new top-level module: put it in its stage folder, or say in docs/architecture.md why not"
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in MODULES if p.parent != PACKAGE}
    assert folders == {name.removeprefix("tcprio.") for name in ALLOWED}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_down_the_pipeline(path: Path) -> None:
    me = module_name(path)
    folder = next((f for f in ALLOWED if within(me, f)), None)
    if folder is None:
        return  # top level: cli, scan, report, datadog join the stages
    allowed = {folder, *LEAVES, *ALLOWED[folder]}
    wrong = sorted(m for m in tcprio_imports(path) if not any(within(m, a) for a in allowed))
    assert not wrong, f"{me} imports {wrong}; {folder} may import only {sorted(allowed)}"


def test_leaves_import_nothing_of_tcprio() -> None:
    for leaf in LEAVES:
        path = PACKAGE / (leaf.removeprefix("tcprio.") + ".py")
        assert tcprio_imports(path) == set(), leaf


def test_the_architecture_page_names_every_module() -> None:
    text = ARCHITECTURE.read_text()
    for path in MODULES:
        if path.name in ("__init__.py", "__main__.py"):
            continue
        shown = str(path.relative_to(PACKAGE))
        assert f"`{shown}`" in text, f"{shown} is not in docs/{ARCHITECTURE.name}"
