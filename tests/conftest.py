"""Shared fixtures: the bundled model loaded once per session, small scene sets."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

from editor import Editor, scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def measure_edits() -> ModuleType:
    """``tools/measure_edits.py`` (not installed). The checkout goes *last* on ``sys.path``,
    so its ``editor/`` (which lacks the bundled model) never shadows the installed one."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    return importlib.import_module("tools.measure_edits")


@pytest.fixture(scope="session")
def editor() -> Editor:
    """The bundled "shapes" model on CPU in fp32, loaded once for the whole run."""
    return Editor.from_pretrained("shapes", device="cpu")


@pytest.fixture(scope="session")
def scenes_small() -> list[scenes.SampledScene]:
    """Eight generator scenes (four with one object, four with two), fixed seeds."""
    return [scenes.sample(70_000 + i, n_objects=1 + i % 2) for i in range(8)]
