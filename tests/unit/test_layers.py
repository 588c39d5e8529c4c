"""The layer contract (tests/layers.py) holds for the package, and fails on a copy of it with
one import planted inside a function: upward, cyclic, or of a package barred from the tier.
(What an import loads at run time: tests/e2e/test_import_isolation.py.)"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
from layers import PACKAGE, TIERS, module_graph, read_package, violations

import m3i_lightning

SRC = Path(m3i_lightning.__file__).resolve().parents[1]


def test_the_package_keeps_its_layers():
    assert violations(SRC) == []


def test_every_subpackage_has_a_tier_and_every_tier_a_subpackage():
    subpackages = {p.name for p in (SRC / PACKAGE).iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(TIERS)


def test_the_conf_package_is_yaml_and_its_folder_only():
    """conf/ sits in the config tier for its YAML; its one name of code is CONF_DIR."""
    tree = ast.parse((SRC / PACKAGE / "conf" / "__init__.py").read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert names == {"CONF_DIR"}
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert [p.name for p in (SRC / PACKAGE / "conf").rglob("*.py")] == ["__init__.py"]


def planted_copy(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with ``line`` inside a new function at the end of ``module``
    (a path relative to the package); returns the copy's source folder."""
    src = tmp_path / "src"
    shutil.copytree(SRC / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    path = src / PACKAGE / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")
    ast.parse(path.read_text())
    return src


@pytest.mark.parametrize("module, line, expected", [
    ("core/errors.py", "from m3i_lightning.commands import pretrain",
     "core/errors.py:.*core \\(tier 0\\) imports m3i_lightning.commands.pretrain"),
    ("objectives/base.py", "from m3i_lightning.engine.module import MultiObjective",
     "objectives/base.py:.*objectives \\(tier 2\\) imports m3i_lightning.engine.module"),
    ("evaluation/protocols.py", "import m3i_lightning.eval",
     "evaluation/protocols.py:.*imports m3i_lightning.eval \\(entry"),
    ("engine/module.py", "from omegaconf import OmegaConf", "engine/module.py:.*imports omegaconf"),
    ("data/module.py", "import hydra", "data/module.py:.*imports hydra"),
    ("components/losses.py", "import lightning as L", "components/losses.py:.*imports lightning"),
    ("objectives/cls.py", "from lightning import LightningModule",
     "objectives/cls.py:.*imports lightning"),
], ids=["upward-to-commands", "objectives-to-engine", "library-to-entry", "omegaconf-in-engine",
        "hydra-in-data", "lightning-in-components", "lightning-in-objectives"])
def test_an_import_planted_inside_a_function_breaks_the_contract(tmp_path, module, line,
                                                                   expected):
    found = violations(planted_copy(tmp_path, module, line))
    assert any(re.search(expected, line) for line in found), found


def test_a_cyclic_import_planted_inside_a_function_is_a_cycle(tmp_path):
    """Close a cycle with an import that goes down the tiers (so only the cycle rule can see
    it): a module of the engine imports another at the top; the other imports it back
    inside a function."""
    modules = read_package(SRC)
    graph = module_graph(modules)
    importer, imported = next((a, b) for a in sorted(graph) for b in sorted(graph[a])
                              if modules[a].layer == modules[b].layer == "engine"
                              and not modules[b].path.name == "__init__.py")
    relative = modules[imported].path.relative_to(SRC / PACKAGE)
    found = violations(planted_copy(tmp_path, str(relative), f"import {importer}"))
    assert found == [f"cycle between modules: {', '.join(sorted([importer, imported]))}"]

