"""pivot-edit's Prompt-to-Prompt against the published controllers (``tests/p2p_reference.py``).

Both run the same edit from the same inversion: pivot-edit through :mod:`editor.editing`
(plan, controller, blend, the one sampling loop), the reference through its own
controllers and its own loop. They must agree to float noise: the latents within 1e-4
(relative) and the decoded images within one level, on the bundled model (16x16
latents; the reference's sizes scaled to it) and on a tiny random-weight UNet shaped
like SD 1.5 (64x64 latents; cross-attention maps 64/32/16 and the mid block's 8; the
reference's own constants). Mappers are compared entry by entry.
"""

from __future__ import annotations

import numpy as np
import p2p_reference as R  # noqa: E402 - the test-only port, beside this file
import pytest
import torch
from transformers import CLIPTokenizer

from editor import EditOptions, InvertOptions, scenes
from editor import prompts as P
from editor.editing import prepare
from editor.inversion import Inversion
from editor.model import Model, bundled_model_path
from editor.sampling import denoise

SRC = "a red circle on a white background"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(str(bundled_model_path() / "tokenizer"))


# -- mappers -------------------------------------------------------------------------------------

REFINE_PAIRS = [
    (SRC, "a big red circle on a white background"),
    (SRC, "a circle on a white background"),
    ("a big red circle on a white background", SRC),
    ("a red circle and a blue square on a gray background",
     "a red circle and a big blue square on a gray background"),
    ("a red circle and a blue square on a gray background", "a blue square on a gray background"),
    ("a a a", "a a"), ("a a", "a a a"), ("a red a red", "a red red a"), (SRC, SRC),
    ("a cat sitting on a bench", "a fluffy cat sitting on a wooden bench in the park"),
]
REPLACE_PAIRS = [
    (SRC, "a blue circle on a white background"),
    (SRC, "a red square on a black background"),
    ("a red circle and a blue square on a gray background",
     "a green circle and a blue triangle on a gray background"),
    (SRC, SRC),
]


@pytest.mark.parametrize("src,tgt", REFINE_PAIRS)
def test_refine_mapper_is_the_published_one(tok, src, tgt):
    index, alpha = P.refine_mapper(tok, src, tgt, 77)
    ref_index, ref_alpha = R.get_mapper(src, tgt, tok)
    assert torch.equal(alpha, ref_alpha)
    used = alpha > 0  # where alpha is 0 the published index is -1 (never read)
    assert torch.equal(index[used], ref_index[used])


@pytest.mark.parametrize("src,tgt", REPLACE_PAIRS)
def test_replace_mapper_is_the_published_one(tok, src, tgt):
    assert torch.equal(P.replace_mapper(tok, src, tgt, 77), R.get_replacement_mapper([src, tgt], tok)[0])


# -- edits, bundled model ----------------------------------------------------------------------------


def _ours(model: Model, inv: Inversion, target: str, options: EditOptions) -> torch.Tensor:
    prep = prepare(model, inv, [target], options)
    return denoise(model, inv, prep.emb, guidance=prep.guidance, controller=prep.controller,
                   blend=prep.blend, progress=False)


def _reference(model: Model, inv: Inversion, prompts: list[str], controller) -> torch.Tensor:
    sched = model.scheduler()
    sched.set_timesteps(inv.steps)
    emb = model.encode_text(prompts).float()
    uncond = [inv.uncond_at(i).float() for i in range(inv.steps)]
    hw = tuple(inv.z_T.shape[-2:])
    return R.edit_loop(model.unet, sched, controller, emb, inv.z_T.float(), uncond,
                       sched.timesteps, inv.guidance, hw)


def _cases(src: str, tgt: str, tok, n: int, sizes: dict) -> dict:
    """name -> (target, pivot-edit options, a factory of the reference controller)."""
    kw = dict(tokenizer=tok, max_queries=sizes["max_queries"], store_max_queries=sizes["store"])
    lb = dict(tokenizer=tok, num_steps=n, latent_size=sizes["latent"], blend_side=sizes["side"])
    prompts = [src, tgt]
    old = next(a for a, b in zip(src.split(), tgt.split(), strict=True) if a != b)
    new = next(b for a, b in zip(src.split(), tgt.split(), strict=True) if a != b)
    bigger = src.replace("a ", "a big ", 1)
    smaller = " ".join(w for w in src.split() if w != src.split()[1])  # drop the first colour
    rw = {"default_": 0.8, new: (0.2, 0.6)}
    return {
        "replace": (tgt, EditOptions(mode="replace", blend_words=None),
                    lambda: R.AttentionReplace(prompts, n, 0.8, 0.4, **kw)),
        "refine-added": (bigger, EditOptions(blend_words=None),
                         lambda: R.AttentionRefine([src, bigger], n, 0.8, 0.4, **kw)),
        "refine-removed": (smaller, EditOptions(blend_words=None),
                           lambda: R.AttentionRefine([src, smaller], n, 0.8, 0.4, **kw)),
        "reweight-window": (
            tgt, EditOptions(mode="replace", blend_words=None, reweight={new: 2.0},
                             reweight_text=False, cross_replace=rw),
            lambda: R.AttentionReweight(
                prompts, n, dict(rw), 0.4, R.get_equalizer(tgt, (new,), (2.0,), tok),
                controller=R.AttentionReplace(prompts, n, dict(rw), 0.4, **kw), **kw)),
        "blend-0.3": (tgt, EditOptions(mode="replace", blend_words=[old, new],
                                       blend_mask="attention", pixel_blend=False),
                      lambda: R.AttentionReplace(prompts, n, 0.8, 0.4, **kw, local_blend=R.LocalBlend(
                          prompts, ((old,), (new,)), **lb))),
        "blend-0.9": (tgt, EditOptions(mode="replace", blend_words=[old, new],
                                       blend_mask="attention", blend_threshold=0.9,
                                       pixel_blend=False),
                      lambda: R.AttentionReplace(prompts, n, 0.8, 0.4, **kw, local_blend=R.LocalBlend(
                          prompts, ((old,), (new,)), th=(0.9, 0.9), **lb))),
        "self-0.35": (tgt, EditOptions(mode="replace", blend_words=None, self_replace=0.35),
                      lambda: R.AttentionReplace(prompts, n, 0.8, 0.35, **kw)),
    }


def _agree(model: Model, inv: Inversion, target: str, options: EditOptions, controller,
           decode: bool) -> None:
    ours = _ours(model, inv, target, options)
    ref = _reference(model, inv, [inv.prompt, target], controller)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale, float((ours - ref).abs().max() / scale)
    if decode:
        a = np.stack([np.asarray(im, np.int32) for im in model.decode_latents(ours)])
        b = np.stack([np.asarray(im, np.int32) for im in model.decode_latents(ref)])
        assert np.abs(a - b).max() <= 1


BUNDLED_SIZES = {"latent": (16, 16), "side": 8, "max_queries": 16 * 16 // 4, "store": 16 * 16}


@pytest.fixture(scope="module")
def bundled_inversions(editor):
    one = scenes.sample(101, n_objects=1)
    two = scenes.sample(70_001, n_objects=2)
    opts = InvertOptions(method="null-text", steps=10, num_inner_steps=2)
    invs = editor.invert_batch([one.image, two.image], [one.caption, two.caption], opts,
                               progress=False)
    return {"one": (one, invs[0]), "two": (two, invs[1])}


@pytest.mark.parametrize("case", ["replace", "refine-added", "refine-removed", "reweight-window",
                                  "blend-0.3", "blend-0.9", "self-0.35"])
def test_bundled_model_edit_equals_the_published_controllers(editor, tok, bundled_inversions, case):
    s, inv = bundled_inversions["one"]
    color = s.scene.objects[0].color
    tgt = inv.prompt.replace(color, "blue" if color != "blue" else "red", 1)
    target, options, make = _cases(inv.prompt, tgt, tok, inv.steps, BUNDLED_SIZES)[case]
    _agree(editor.model, inv, target, options, make(), decode=True)


def test_bundled_model_two_object_refine_equals_the_published_controller(editor, tok,
                                                                          bundled_inversions):
    s, inv = bundled_inversions["two"]
    second = s.scene.objects[1].phrase()
    target = inv.prompt.replace(second, "big " + second)
    ctrl = R.AttentionRefine([inv.prompt, target], inv.steps, 0.8, 0.4, tokenizer=tok,
                             max_queries=BUNDLED_SIZES["max_queries"],
                             store_max_queries=BUNDLED_SIZES["store"])
    _agree(editor.model, inv, target, EditOptions(blend_words=None), ctrl, decode=True)


# -- edits, a random UNet shaped like SD 1.5 ----------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_shaped():
    """SD 1.5's UNet structure (cross-attention at 64/32/16 in down and up blocks, 2 and 3
    per level, mid at 8) at 64x64 latents, with few channels and random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                            norm_num_groups=8, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407))
        z_T = torch.randn(1, 4, 64, 64)
    tok = CLIPTokenizer.from_pretrained(str(bundled_model_path() / "tokenizer"))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    model = Model.from_pipe(pipe, "sd15-shaped-random")
    steps = 6
    inv = Inversion(prompt=SRC, method="ddim", steps=steps, guidance=7.5, z_T=z_T,
                    uncond=model.encode_text([""]).float(), timesteps=model.timesteps(steps),
                    image_size=(512, 512), model_id=model.model_id,
                    model_fingerprint=model.fingerprint, image_hash="random")
    return model, inv


SD15_SIZES = {"latent": (64, 64), "side": 16, "max_queries": 32**2, "store": 32**2}  # published


@pytest.mark.parametrize("case", [
    "replace",
    pytest.param("blend-0.3", marks=pytest.mark.slow),
    pytest.param("refine-added", marks=pytest.mark.slow),
    pytest.param("refine-removed", marks=pytest.mark.slow),
    pytest.param("reweight-window", marks=pytest.mark.slow),
    pytest.param("blend-0.9", marks=pytest.mark.slow),
    pytest.param("self-0.35", marks=pytest.mark.slow),
])
def test_sd15_shaped_edit_equals_the_published_controllers(sd15_shaped, tok, case):
    model, inv = sd15_shaped
    target, options, make = _cases(SRC, "a blue circle on a white background", tok, inv.steps,
                                   SD15_SIZES)[case]
    _agree(model, inv, target, options, make(), decode=False)


def test_sd15_shaped_blend_reads_the_16x16_maps(sd15_shaped):
    model, inv = sd15_shaped
    prep = prepare(model, inv, ["a blue circle on a white background"],
                   EditOptions(blend_words=["red", "blue"], blend_mask="attention"))
    assert prep.blend_keys == [(16, 16, False)]
    half = prepare(model, inv, ["a blue circle on a white background"],
                   EditOptions(blend_words=["red", "blue"], blend_mask="attention",
                               blend_maps="half"))
    assert half.blend_keys == [(64, 64, False), (32, 32, False)]
