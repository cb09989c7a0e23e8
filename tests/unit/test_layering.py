"""Import rules of the package layout (ARCHITECTURE.md), read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kp_gateway

PACKAGE = Path(kp_gateway.__file__).resolve().parent
CONCRETE_BACKENDS = {f"kp_gateway.backends.{name}" for name in ("fs", "s3", "sqlite", "opensearch")}
# What the document format may use: no files, sockets, threads or loops.
KAAPANA_MAY_IMPORT = {"kp_gateway.kaapana", "kp_gateway.model"}
IO_MODULES = {"asyncio", "io", "os", "pathlib", "shutil", "socket", "subprocess", "tempfile"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_only_backends_import_a_concrete_backend(path: Path) -> None:
    """app.py and the rest reach backends through make_storage/make_index and the Protocols."""
    if _module_name(path).startswith("kp_gateway.backends"):
        return
    assert not _imports(path) & CONCRETE_BACKENDS


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "kaapana").glob("*.py")), ids=lambda p: _module_name(p)
)
def test_kaapana_is_pure(path: Path) -> None:
    """The document format does no I/O and depends on nothing of the gateway but model.py."""
    imported = _imports(path)
    ours = {m for m in imported if m.startswith("kp_gateway.")}
    assert all(m.startswith(tuple(KAAPANA_MAY_IMPORT)) for m in ours), ours
    assert not {m.split(".")[0] for m in imported} & IO_MODULES
