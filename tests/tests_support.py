"""Small shared pieces for the tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

from editor import scenes


def fake_editor_and_manifest(folder: Path):
    """The batch tests' stub engine and a one-item manifest (image ``a.png``) in ``folder``."""
    from test_batch import FakeEditor

    scenes.sample(1, n_objects=1).image.save(folder / "a.png")
    m = folder / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "image": "a.png", "prompt": "a red circle",
                             "edits": ["a blue circle"]}))
    return FakeEditor(), m


def eager_capture(calls: list[str]):
    """A stand-in for CUDA graph capture: warm up like the real one, then 'replay' eagerly."""

    def capture(fn, warmup):
        for _ in range(warmup):
            fn()
        calls.append(fn.__name__)
        return fn

    return capture
