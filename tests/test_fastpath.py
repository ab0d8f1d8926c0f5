"""Fast null-text path: the static-buffer step equals the plain loop (CPU-testable parts)."""

from __future__ import annotations

import pytest
import torch
from tests_support import eager_capture

from editor import InvertOptions, scenes
from editor.fastpath import FastPath, StaticNullText, adam_masked_, resolve_fast
from editor.inversion import invert_batch

# steps 4, 4 inner steps and this threshold make the two scenes stop at different inner
# steps (some timesteps after 1, others run all 4), so masking is exercised
MIXED = dict(steps=4, num_inner_steps=4, early_stop_epsilon=0.03)


def run(editor, imgs, caps, fast=None, **kw):
    return invert_batch(editor.model, imgs, caps, InvertOptions(**MIXED, **kw), fast=fast,
                        progress=False)


def test_adam_masked_equals_torch_adam_and_freezes_rows():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 5, 7, generator=g)
    grads = [torch.randn(3, 5, 7, generator=g) for _ in range(6)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2 * 0.97)
    mine, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step, lr = torch.zeros((), dtype=torch.float64), torch.tensor(1e-2 * 0.97, dtype=torch.float64)
    active = torch.tensor([True, False, True])
    for gr in grads:
        ref.grad = gr.clone()
        opt.step()
        adam_masked_(mine, gr, m, v, step, lr, active)
    assert torch.equal(mine[0], ref.detach()[0]) and torch.equal(mine[2], ref.detach()[2])
    assert torch.equal(mine[1], p0[1])  # inactive row untouched
    assert torch.equal(m, opt.state[ref]["exp_avg"]) and torch.equal(v, opt.state[ref]["exp_avg_sq"])


def test_static_step_equals_plain_loop(editor):
    """Same embeddings, stop counts and latents as the plain loop, bit for bit, whether the
    host checks the stop mask every inner step or never, eagerly or through the capture
    machinery (warm-ups change the buffers; capture must give them back)."""
    a, b = scenes.sample(103, n_objects=1), scenes.sample(104, n_objects=2)
    imgs, caps = [a.image, b.image], [a.caption, b.caption]
    plain = run(editor, imgs, caps)  # sync_every=None: 1 on CPU
    stops = [inv.stats["inner_steps"] for inv in plain]
    assert stops[0] != stops[1] and 1 in stops[0] + stops[1] and 4 in stops[0] + stops[1]

    fast = FastPath("static-eager")
    eager = run(editor, imgs, caps, fast=fast, sync_every=0)
    (runner,) = fast._runners.values()
    calls: list[str] = []
    runner.graphs, runner._capture = True, eager_capture(calls)  # exercise capture + restore
    captured = run(editor, imgs, caps, fast=fast, sync_every=2)
    assert sorted(calls) == ["_advance", "_cond", "_inner", "_pivot"]  # each captured once
    for want, *got in zip(plain, eager, captured, strict=True):
        for inv in got:
            assert inv.stats["inner_steps"] == want.stats["inner_steps"]
            assert inv.stats["final_mse"] == want.stats["final_mse"]
            assert torch.equal(inv.uncond, want.uncond)
            assert torch.equal(inv.z_T, want.z_T)
            assert inv.stats["fast"]["mode"] == "static-eager"


def test_resolve_fast_is_off_or_refused_on_cpu(editor):
    cpu = torch.device("cpu")
    assert resolve_fast(None, cpu) is None
    assert resolve_fast("auto", cpu) is None
    assert resolve_fast("auto", torch.device("cuda")).mode == "cuda-graph"
    assert resolve_fast("static-eager", cpu).mode == "static-eager"
    for mode in ("cuda-graph", "compile", "compile+cuda-graph"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_fast(mode, cpu)
    with pytest.raises(ValueError, match="unknown fast mode"):
        FastPath("turbo")
    with pytest.raises(ValueError, match="float16"):
        resolve_fast(FastPath("static-eager", dtype="fp16"), cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):  # through the public entry
        editor.invert(scenes.sample(1).image, "a red circle", InvertOptions(fast="cuda-graph", steps=2))
    with pytest.raises(ValueError, match="sync_every"):
        editor.invert(scenes.sample(1).image, "a red circle", InvertOptions(sync_every=-1, steps=2))


def test_reduced_precision_unet_is_a_private_copy(editor):
    fast = FastPath("static-eager", dtype="bf16")
    unet = fast.unet_for(editor.model)
    assert unet is not editor.pipe.unet and unet.dtype == torch.bfloat16
    assert editor.pipe.unet.dtype == torch.float32  # the shared model is untouched
    assert fast.unet_for(editor.model) is unet  # prepared once per model
    z0, cond = torch.zeros(2, 4, 16, 16), torch.zeros(2, 77, 64)
    r = fast.runner(editor.model, z0, cond, guidance=7.5, early_stop=False)
    assert isinstance(r, StaticNullText) and r.dt == torch.bfloat16
    assert r.emb.dtype == r.m.dtype == r.loss.dtype == torch.float32  # fp32 optimisation
    assert fast.runner(editor.model, z0, cond, guidance=7.5, early_stop=False) is r  # per shape
    assert fast.runner(editor.model, z0[:1], cond[:1], guidance=7.5, early_stop=False) is not r
