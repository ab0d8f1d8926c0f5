"""Shared fixtures: the bundled model loaded once per session, small scene sets."""

from __future__ import annotations

import pytest

from editor import scenes
from editor.model import Editor


@pytest.fixture(scope="session")
def editor() -> Editor:
    """The bundled "shapes" model on CPU in fp32, loaded once for the whole run."""
    return Editor.from_pretrained("shapes", device="cpu")


@pytest.fixture(scope="session")
def scenes_small() -> list[scenes.SampledScene]:
    """Eight generator scenes (four with one object, four with two), fixed seeds."""
    return [scenes.sample(70_000 + i, n_objects=1 + i % 2) for i in range(8)]
