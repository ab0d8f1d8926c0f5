"""Attention processors and controllers (bundled model, a few UNet calls)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from editor.attention import (
    AttentionController,
    AttentionStore,
    ControlledAttnProcessor,
    LayerInfo,
    PromptToPrompt,
    attention_control,
    describe_layers,
)
from editor.blending import LocalBlend


@pytest.fixture(scope="module")
def unet(editor):
    return editor.pipe.unet


@pytest.fixture(scope="module")
def latent_hw(unet):
    s = int(unet.config.sample_size)
    return (s, s)


def _run(unet, latent_hw, rows=2, ctx=None, steps=(0,), controller=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, *latent_hw, generator=g)
    if ctx is None:
        ctx = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g)
    outs = []
    for i in steps:
        if controller is not None:
            controller.set_step(i)
        outs.append(unet(x, 500, encoder_hidden_states=ctx).sample)
    return outs


class Recorder(AttentionController):
    """Records (step, layer) of every call; wants what ``pred`` says."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred
        self.calls: list[tuple[int | None, LayerInfo, tuple[int, ...]]] = []

    def wants(self, layer):
        return self.pred(layer)

    def __call__(self, probs, layer, heads):
        self.calls.append((self.step, layer, tuple(probs.shape)))
        return probs


def test_describe_layers_sizes_match_calls(unet, latent_hw):
    layers = describe_layers(unet, latent_hw)
    assert set(layers) == set(unet.attn_processors)
    assert any(la.cross for la in layers.values()) and any(not la.cross for la in layers.values())
    rec = Recorder(lambda la: True)
    with attention_control(unet, rec, latent_hw):
        _run(unet, latent_hw, controller=rec)
    assert len(rec.calls) == len(layers)
    for _, layer, shape in rec.calls:
        assert shape[1] == layer.queries  # the processor checks this too
        assert shape[2] == (77 if layer.cross else layer.queries)


def test_only_wanted_layers_get_explicit_probabilities_and_restore(unet, latent_hw):
    before = dict(unet.attn_processors)
    rec = Recorder(lambda la: la.cross)
    with attention_control(unet, rec, latent_hw) as registered:
        procs = unet.attn_processors
        for name, p in procs.items():
            cross = describe_layers(unet, latent_hw)[name].cross
            assert isinstance(p, ControlledAttnProcessor) == cross
            if not cross:
                assert p is before[name]
        assert all(la.cross for la in registered)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_processors_restored_on_error(unet, latent_hw):
    before = dict(unet.attn_processors)

    class Boom(Recorder):
        def __call__(self, probs, layer, heads):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        c = Boom(lambda la: True)
        with attention_control(unet, c, latent_hw):
            _run(unet, latent_hw, controller=c)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_zero_registered_layers_is_an_error(unet, latent_hw):
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="no layer"):
        with attention_control(unet, Recorder(lambda la: False), latent_hw):
            pass
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_step_is_passed_in_not_counted(unet, latent_hw):
    rec = Recorder(lambda la: la.cross)
    with attention_control(unet, rec, latent_hw):
        _run(unet, latent_hw, steps=(7, 7, 3), controller=rec)
    n = sum(la.cross for la in describe_layers(unet, latent_hw).values())
    assert [c[0] for c in rec.calls] == [7] * n + [7] * n + [3] * n


def test_p2p_requires_set_step(unet, latent_hw):
    c = PromptToPrompt(rows=1, store_keys={(*latent_hw, False)})
    with attention_control(unet, c, latent_hw), pytest.raises(RuntimeError, match="set_step"):
        _run(unet, latent_hw, rows=1)


def test_controlled_processor_matches_sdpa_without_edits(unet, latent_hw):
    ref = _run(unet, latent_hw)[0]
    rec = Recorder(lambda la: True)
    with attention_control(unet, rec, latent_hw):
        got = _run(unet, latent_hw, controller=rec)[0]
    assert torch.allclose(got, ref, atol=1e-4)


def test_self_replace_only_on_small_maps(unet, latent_hw):
    q_max = latent_hw[0] * latent_hw[1] // 4
    c = PromptToPrompt(rows=2, self_window=(0, 5), self_max_queries=q_max)
    layers = describe_layers(unet, latent_hw).values()
    wanted = [la for la in layers if c.wants(la)]
    assert wanted and all(not la.cross and la.queries <= q_max for la in wanted)
    assert any(not la.cross and la.queries > q_max for la in layers)


def test_p2p_cross_replace_and_reweight_act_on_conditional_target_rows():
    """Reweight scales the injected attention (as the published AttentionReweight): inside
    the injection window the target takes the source's columns times the equalizer,
    outside it keeps its own attention, unscaled."""
    heads, q, L = 2, 4, 5
    eye = torch.eye(L)[None]
    window = torch.ones(3, 1, L)
    window[2] = 0.0  # injection during steps 0 and 1
    c = PromptToPrompt(rows=2, mapper=eye, token_alpha=torch.ones(1, L), cross_alpha=window,
                       equalizer=torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]]))
    layer = LayerInfo("x", True, (2, 2))
    probs = torch.rand(4 * heads, q, L).softmax(-1)  # uncond src, uncond tgt, cond src, cond tgt
    orig = probs.clone()
    c.set_step(0)
    out = c(probs.clone(), layer, heads).view(4, heads, q, L)
    o = orig.view(4, heads, q, L)
    assert torch.equal(out[:3], o[:3])  # unconditional half and the source untouched
    want = o[2].clone()
    want[..., 1] *= 2
    assert torch.allclose(out[3], want)
    c.set_step(2)  # outside the window: the target's own attention, not reweighted
    out = c(probs.clone(), layer, heads).view(4, heads, q, L)
    assert torch.equal(out[3], o[3])


def test_store_and_local_blend_mask():
    key = (4, 4, False)
    store = AttentionStore({key})
    maps = torch.zeros(2, 16, 3)
    maps[0, 5, 1] = 1.0  # source row, token 1 at (1, 1)
    maps[1, 10, 2] = 1.0  # target row, token 2 at (2, 2)
    store.add(key, maps)
    add = torch.tensor([[0, 1.0, 0], [0, 0, 1.0]])
    lb = LocalBlend(add, [key], start=1, threshold=0.3)
    m = lb.mask(store, (8, 8))
    assert m.shape == (2, 1, 8, 8)
    assert m[1].sum() > m[0].sum()  # target = union of source and target regions
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert torch.equal(lb(x, store, 0), x)  # before start: untouched
    y = lb(x, store, 1)
    assert torch.equal(y[1][0].bool(), m[1, 0]) and torch.equal(y[0], x[0])


def test_noise_blend_mask_from_prediction_difference():
    lb = LocalBlend(None, [], start=0, source="noise", noise_until=2, noise_threshold=0.4)
    src = torch.zeros(1, 4, 8, 8)
    tgt = torch.zeros(1, 4, 8, 8)
    tgt[0, :, 2:4, 2:4] = 1.0
    assert lb.wants_noise(1) and not lb.wants_noise(2)
    lb.observe(src, tgt, 0)
    lb.observe(src, tgt.flip(-1) * 100, 5)  # after noise_until: ignored
    m = lb.mask(AttentionStore(set()), (8, 8))
    assert not m[0].any()
    assert m[1, 0, 2:4, 2:4].all() and not m[1, 0, 6:, 6:].any()


def test_unused_processor_class_still_default(unet):
    # the model ships SDPA processors: the ones we do not touch stay SDPA
    assert any(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
