"""The README's layout table names every module of the packages, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_import_layers import LAYERS

REPO = Path(__file__).resolve().parents[1]


def layout_paths() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]
    return {
        p for row in table.splitlines() if row.startswith("| `") for p in re.findall(r"`([^`]+)`", row.split("|")[1])
    }


def test_every_module_is_in_the_layout_table():
    named = layout_paths()
    modules = {
        str(f.relative_to(REPO)) for pkg in LAYERS for f in (REPO / pkg).rglob("*.py") if f.name != "__init__.py"
    }
    assert sorted(modules - named) == []


def test_every_path_in_the_layout_table_exists():
    assert sorted(p for p in layout_paths() if not (REPO / p.rstrip("/")).exists()) == []
