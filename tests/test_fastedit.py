"""The fast edit loop (editor/fastedit.py): in ``static-eager`` mode it equals the eager
sampling loop bit for bit, for every kind of edit, and so does its capture machinery run
with an eager stand-in for CUDA graph capture (what the CPU can check of the graph path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests_support import eager_capture

from editor import EditOptions, InvertOptions, editing, scenes
from editor.fastedit import MAX_EDIT_RUNNERS, StaticEdit, edit_runner, fast_denoise
from editor.fastpath import FastPath
from editor.sampling import denoise

STEPS = 5  # blend_start 0.2 -> blending from step 1; noise mask on step 0; self window 0..1


@pytest.fixture(scope="module")
def scene():
    return scenes.sample(103, n_objects=2)  # "a yellow circle and a green triangle on a black ..."


@pytest.fixture(scope="module")
def inversions(editor, scene):
    """A null-text and a direct inversion (offsets on the source row) of one scene."""
    out = {}
    for method in ("null-text", "direct"):
        out[method] = editor.invert(
            scene.image, scene.caption,
            InvertOptions(method=method, steps=STEPS, num_inner_steps=2,
                          check_reconstruction=False), progress=False)
    return out


def _mask(scene) -> np.ndarray:
    m = np.zeros(scene.image.size[::-1], np.float32)
    m[: m.shape[0] // 2] = 1.0
    return m


def _both(editor, inv, targets, options, *, mask=None, fast=None):
    """(eager latents, fast latents, eager prep, fast prep) of one edit."""
    preps = [editing.prepare(editor.model, inv, targets, options, mask=mask) for _ in range(2)]
    a, b = preps
    ref = denoise(editor.model, inv, a.emb, guidance=a.guidance, controller=a.controller,
                  blend=a.blend, progress=False)
    got = fast_denoise(editor.model, inv, b.emb, fast=fast or FastPath("static-eager"),
                       guidance=b.guidance, controller=b.controller, blend=b.blend,
                       progress=False)
    return ref, got, a, b


def _same_state(a, b) -> None:
    """The controller's store and the blend's masks as the eager loop leaves them."""
    sa, sb = a.controller.store, b.controller.store
    assert sa.counts == sb.counts and set(sa.sums) == set(sb.sums)
    for k in sa.sums:
        assert torch.equal(sa.sums[k], sb.sums[k]), k
    if a.blend is None:
        assert b.blend is None
        return
    for name in ("noise", "last_mask"):
        x, y = getattr(a.blend, name), getattr(b.blend, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    hw = (64, 64)
    pa, pb = a.blend.pixel_mask(hw), b.blend.pixel_mask(hw)
    assert (pa is None and pb is None) or torch.equal(pa, pb)


CASES = {
    "replace, noise blend (defaults)": (["a yellow square and a green triangle on a black background"],
                                       EditOptions(), False),
    "refine": (["a yellow circle and a big green triangle on a black background"],
               EditOptions(), False),
    "reweight": (["a yellow circle and a green triangle on a black background"],
                 EditOptions(reweight={"yellow": 2.0}), False),
    "word blend (attention), subtract": (["a red circle and a green triangle on a black background"],
                                         EditOptions(blend_words=("circle",),
                                                     blend_subtract=("triangle",)), False),
    "no blend, self window (0.2, 0.8)": (["a yellow circle and a blue triangle on a black background"],
                                         EditOptions(blend_words=None, self_replace=(0.2, 0.8),
                                                     cross_replace={"default_": 0.6,
                                                                    "blue": 0.2}), False),
    "user mask": (["a yellow circle and a green square on a black background"],
                  EditOptions(), True),
    "user mask intersect, 2 targets": (["a yellow circle and a green square on a black background",
                                        "a red circle and a green triangle on a black background"],
                                       EditOptions(mask_mode="intersect"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_static_eager_edit_equals_eager_loop(editor, inversions, scene, case):
    targets, options, masked = CASES[case]
    inv = inversions["null-text"]
    ref, got, a, b = _both(editor, inv, targets, options, mask=_mask(scene) if masked else None)
    assert torch.equal(ref, got)
    _same_state(a, b)


def test_direct_inversion_offsets_and_capture_machinery(editor, inversions):
    """Offsets on the source row; the step shapes captured once each (warm-ups change the
    buffers: capture must give them back); a second edit of the same shape reuses the
    runner and its captures, with its own values loaded."""
    inv = inversions["direct"]
    fast = FastPath("static-eager")
    t1 = ["a yellow circle and a red triangle on a black background"]
    t2 = ["a blue circle and a green triangle on a black background"]
    # prime the runner, then switch it to the capture path with the eager stand-in
    p = editing.prepare(editor.model, inv, t1, EditOptions())
    runner = edit_runner(fast, editor.model, inv, p.emb, p.controller, p.blend, p.guidance)
    calls: list[str] = []
    runner.graphs, runner._capture = True, eager_capture(calls)
    for targets in (t1, t2):
        ref, got, a, b = _both(editor, inv, targets, EditOptions(), fast=fast)
        assert torch.equal(ref, got)
        _same_state(a, b)
    assert sorted(calls) == ["step_blend", "step_noise"]  # STEPS=5: noise on step 0, then blend
    assert len(fast._edit_runners) == 1 and set(runner.capture_seconds) == set(calls)


def test_edit_many_fast_option_end_to_end(editor, inversions, scene):
    """Through the facade: EditOptions(fast="static-eager") gives the eager edit's images,
    masks and attention maps; "auto" is the eager loop on CPU; the editor's one FastPath
    keeps the runner across calls (graphs would be captured once)."""
    inv = inversions["null-text"]
    targets = ["a yellow square and a green triangle on a black background"]
    eager = editor.edit_many(inv, targets, EditOptions(fast=None), progress=False)
    fast = editor.edit_many(inv, targets, EditOptions(fast="static-eager"), progress=False)
    for x, y in zip(eager, fast, strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.mask, y.mask) and np.array_equal(x.mask_image, y.mask_image)
        assert x.attention_maps.keys() == y.attention_maps.keys()
        for w in x.attention_maps:
            assert np.array_equal(x.attention_maps[w], y.attention_maps[w])
    fp = editor.fast_path("static-eager")
    assert fp is editor.fast_path("static-eager") and len(fp._edit_runners) == 1
    editor.edit_many(inv, targets, EditOptions(fast="static-eager"), progress=False)
    assert len(fp._edit_runners) == 1
    assert editor.fast_path("auto") is None  # CPU: the eager loop
    with pytest.raises(ValueError, match="needs a CUDA device"):
        editor.edit(inv, targets[0], EditOptions(fast="cuda-graph"), progress=False)
    with pytest.raises(ValueError, match="unknown fast mode"):
        EditOptions(fast="warp")


def test_runner_cache_is_bounded(editor, inversions):
    inv = inversions["null-text"]
    fast = FastPath("static-eager")
    base = "a yellow circle and a green triangle on a black background"
    for k in range(MAX_EDIT_RUNNERS + 2):  # a new noise threshold: a new signature each time
        p = editing.prepare(editor.model, inv, [base.replace("yellow", "red")],
                            EditOptions(noise_threshold=0.3 + 0.05 * k))
        r = edit_runner(fast, editor.model, inv, p.emb, p.controller, p.blend, p.guidance)
        assert isinstance(r, StaticEdit)
    assert len(fast._edit_runners) == MAX_EDIT_RUNNERS
