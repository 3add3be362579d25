"""The dependency direction of the layout: the core library (`fedspec/` except the CLI on top) never imports
Flower, nor the Flower-side packages installed under the `fedspec.` namespace (server, client, strategies,
simulations), so `fedspec train`, the adapters, the SVD engine and the privacy accounting work without Flower.
Static, so it cannot be fooled by another test having imported flwr already in this process."""

from __future__ import annotations

import ast
from pathlib import Path

import fedspec

CORE = Path(fedspec.__file__).parent
FLOWER_SIDE = {"server", "client", "strategies", "simulations"}
ALLOWED = {"cli.py"}  # the face on top may reach everything (inside the commands that need it)


def _absolute_imports(source: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = source.relative_to(CORE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join((*base, node.module) if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_core_library_never_imports_flower_or_the_flower_side():
    scanned, offenders = [], []
    for source in sorted(CORE.rglob("*.py")):
        if source.relative_to(CORE).as_posix() in ALLOWED:
            continue
        scanned.append(source)
        for module in _absolute_imports(source):
            parts = module.split(".")
            if parts[0] == "flwr" or (parts[0] == "fedspec" and len(parts) > 1 and parts[1] in FLOWER_SIDE):
                offenders.append(f"{source.relative_to(CORE.parent)} imports {module}")
    assert len(scanned) > 40  # the scan sees the whole core, subpackages included
    assert not offenders, offenders


def test_the_scan_sees_real_imports():
    imports = _absolute_imports(CORE / "privacy" / "accounting.py")
    assert "opacus.accountants" in imports  # absolute
    assert "fedspec.errors.FedspecError" in imports  # relative (from ..errors import FedspecError), resolved
    assert "fedspec.simulations.driver" in _absolute_imports(CORE / "cli.py")  # the CLI is allowed to
