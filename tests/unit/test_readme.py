"""The README's "Layout" section is the package as it is: every subpackage listed once with the
tier the layer contract (tests/layers.py) gives it, nothing listed that does not exist, and the
root holding the entry modules it names."""

from __future__ import annotations

import re

from helpers import REPO
from layers import ENTRIES, PACKAGE, TIERS

PACKAGE_DIR = REPO / "src" / PACKAGE


def layout_section() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"\n## Layout\n(.*?)(?=\n## |\Z)", text, re.S).group(1)


def layout_rows() -> list[tuple[int, str, str]]:
    """(tier, subpackage, may-import cell) of each row of the Layout table."""
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)/` \| .* \| ([\d-]+) \|$", layout_section(), re.M)
    return [(int(tier), name, may_import) for tier, name, may_import in rows]


def test_every_subpackage_is_listed_once_and_nothing_else():
    listed = [name for _, name, _ in layout_rows()]
    on_disk = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file()}
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == on_disk


def test_each_listed_tier_is_the_layer_contracts():
    for tier, name, may_import in layout_rows():
        assert TIERS.get(name) == tier, (name, tier)
        assert may_import == ("0" if tier == 0 else f"0-{tier}"), (name, may_import)


def test_the_root_holds_the_entry_modules_the_section_names():
    root = {p.stem for p in PACKAGE_DIR.glob("*.py")}
    assert root == ENTRIES
    named = set(re.findall(r"`(\w+)`", layout_section().split("The root keeps", 1)[1]))
    assert ENTRIES <= named
