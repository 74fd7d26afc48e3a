"""docs/architecture.md cannot drift from the code: its layer table lists exactly the layers of
the import contract in pyproject.toml, in the same order, and exactly the modules each
subpackage holds. (lint-imports, run by scripts/test, checks that the code keeps the contract.)"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

CONTRACT = "The core's layers import downward only"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([a-z_]+)`\s*\|([^|]*)\|")


def contract_layers() -> list[set[str]]:
    """The core's layers, top to bottom, each a set of sibling names."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["name"] == CONTRACT)
    return [{name.strip() for name in layer.split("|")} for layer in layers]


def documented_rows() -> list[tuple[int, str, set[str]]]:
    """(rank, package or module, modules listed) for each row of the doc's layer table."""
    rows = []
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            modules = set(re.findall(r"`([a-z_0-9]+)`", match.group(3)))
            rows.append((int(match.group(1)), match.group(2), modules))
    return rows


def test_the_documented_layers_are_the_contracts_in_its_order():
    rows = documented_rows()
    assert rows, "docs/architecture.md has no layer table"
    by_rank: dict[int, set[str]] = {}
    for rank, name, _ in rows:
        by_rank.setdefault(rank, set()).add(name)
    assert [by_rank[r] for r in sorted(by_rank)] == contract_layers()


def test_every_subpackage_lists_exactly_its_modules():
    core = REPO / "mergeflow"
    for _, name, modules in documented_rows():
        folder = core / name
        if not folder.is_dir():
            assert (core / f"{name}.py").is_file(), f"{name}: neither a package nor a module"
            continue
        present = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__"}
        assert modules == present, f"{name}/: documented {sorted(modules)}, present {sorted(present)}"


def test_every_package_and_module_of_the_core_is_in_a_layer():
    layered = set().union(*contract_layers())
    core = REPO / "mergeflow"
    present = {p.name for p in core.iterdir() if (p / "__init__.py").is_file()}
    present |= {p.stem for p in core.glob("*.py")} - {"__init__"}
    assert present == layered
