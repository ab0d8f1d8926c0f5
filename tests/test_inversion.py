"""Inversion: the DDIM update, round trips for eps and v models, null-text, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editor import Editor, InvertOptions, scenes
from editor.ddim import ddim_step
from editor.images import psnr, to_tensor
from editor.inversion import Inversion, InversionCancelled, ddim_pivots, invert_batch
from editor.model import bundled_model_path
from editor.sampling import denoise


def sample(ed, inv, cond=None, progress=True):
    """Guided sampling back from ``inv`` (its own prompt unless ``cond`` is given)."""
    if cond is None:
        cond = ed.model.encode_text([inv.prompt]).float()
    return denoise(ed.model, inv, cond, progress=progress)


def inv_opts(**kw):
    return InvertOptions(**kw)


def tiny_editor(prediction_type: str) -> Editor:
    """A random-weight SD-format pipeline (not SD 1.5 shapes) with the given prediction type."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=16,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    tok = CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():  # a smooth random model: small outputs, so DDIM's eps(z_t) ~ eps(z_{t-1})
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    return Editor.from_pipe(pipe, f"tiny-{prediction_type}")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_step_matches_scheduler(kind):
    ed = tiny_editor(kind)
    sched = ed.model.scheduler()
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist()[::5] + [int(sched.timesteps[-1])]:
        want = sched.step(out, t, x).prev_sample
        assert torch.allclose(ddim_step(sched, out, t, x, 20), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_inversion_round_trips_at_guidance_1(kind):
    """Pivots, then sampling with the conditional prediction only, come back to z0."""
    ed = tiny_editor(kind)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    cond = ed.model.encode_text(["a red circle on a white background"]).float()
    steps = 50
    pivots = ddim_pivots(ed.model, z0, cond, steps, progress=False)
    inv = Inversion(prompt="a red circle on a white background", method="ddim", steps=steps,
                    guidance=1.0, z_T=pivots[-1], uncond=cond, timesteps=[
                        int(t) for t in (lambda s: (s.set_timesteps(steps), s.timesteps)[1])(
                            ed.model.scheduler())],
                    image_size=(32, 32), model_id=ed.model_id,
                    model_fingerprint=ed.fingerprint, image_hash="x")
    back = sample(ed, inv, cond, progress=False)
    rel = (back - z0).norm() / z0.norm()
    assert rel < 0.05, f"{kind}: relative round-trip error {rel:.3f}"
    assert not torch.allclose(pivots[-1], z0)  # it did move


def _scene(seed: int) -> scenes.SampledScene:
    return scenes.sample(seed, n_objects=1)


def test_null_text_beats_ddim_and_nears_vae_ceiling(editor):
    sc = _scene(101)
    m = editor.model
    ceiling = psnr(m.decode_latents(m.encode_image(to_tensor(sc.image)))[0], sc.image)
    res = {}
    for method in ("ddim", "null-text", "direct"):
        inv = editor.invert(sc.image, sc.caption, inv_opts(method=method, steps=10), progress=False)
        res[method] = psnr(editor.reconstruct(inv, progress=False), sc.image)
    assert res["null-text"] >= res["ddim"] + 3.0, res
    assert res["null-text"] >= ceiling - 1.5, (res, ceiling)
    assert res["direct"] >= ceiling - 0.5, (res, ceiling)  # exact pivots path


def test_early_stop_disabled_runs_every_inner_step(editor):
    sc = _scene(102)
    inv = editor.invert(sc.image, sc.caption, inv_opts(steps=4, num_inner_steps=3,
                        early_stop_epsilon=None), progress=False)
    assert inv.stats["inner_steps"] == [3, 3, 3, 3]
    early = editor.invert(sc.image, sc.caption, inv_opts(steps=4, num_inner_steps=3,
                          early_stop_epsilon=1.0), progress=False)  # huge threshold: one step each
    assert early.stats["inner_steps"] == [1, 1, 1, 1]
    assert inv.uncond.shape[0] == 4 and inv.uncond.shape[1:] == early.uncond.shape[1:]


def test_batched_equals_one_by_one(editor):
    a, b = _scene(103), scenes.sample(104, n_objects=2)
    o = inv_opts(steps=6, num_inner_steps=4, early_stop_epsilon=2e-3)
    both = invert_batch(editor.model, [a.image, b.image], [a.caption, b.caption], o, progress=False)
    for sc, inv in zip((a, b), both, strict=True):
        one = editor.invert(sc.image, sc.caption, o, progress=False)
        assert inv.stats["inner_steps"] == one.stats["inner_steps"]
        assert torch.allclose(inv.z_T, one.z_T, atol=1e-4)
        # Adam's first steps are ~lr * sign(grad): embedding entries whose gradient is ~0
        # may flip with batch-dependent float rounding, so compare what the embeddings do.
        assert (inv.uncond - one.uncond).abs().mean() < 1e-3
        assert torch.allclose(sample(editor, inv, progress=False),
                              sample(editor, one, progress=False), atol=2e-3)
    # the two images really stopped at different inner steps or differ in embeddings
    assert not torch.allclose(both[0].uncond, both[1].uncond)


def test_negative_prompt_uses_source_prompt_as_null(editor):
    sc = _scene(105)
    inv = editor.invert(sc.image, sc.caption, inv_opts(method="negative-prompt", steps=5),
                        progress=False)
    assert torch.allclose(inv.uncond[0], editor.model.encode_text([sc.caption])[0].float().cpu())


def test_cancel_and_progress(editor):
    sc = _scene(106)
    seen = []
    with pytest.raises(InversionCancelled):
        editor.invert(sc.image, sc.caption, inv_opts(steps=5, num_inner_steps=1), progress=False,
                      callback=lambda done, total: seen.append((done, total)) or done < 3)
    assert seen[-1] == (3, 10)


def test_save_load_round_trip_and_model_check(editor, tmp_path):
    sc = _scene(107)
    inv = editor.invert(sc.image, sc.caption, inv_opts(method="direct", steps=4), progress=False)
    path = inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(path)
    assert back.prompt == inv.prompt and back.method == "direct" and back.steps == 4
    assert back.timesteps == inv.timesteps and back.image_hash == inv.image_hash
    assert torch.equal(back.z_T, inv.z_T) and torch.equal(back.offsets, inv.offsets)
    assert np.array_equal(np.asarray(editor.reconstruct(back, progress=False)),
                          np.asarray(editor.reconstruct(inv, progress=False)))
    other = tiny_editor("epsilon")
    with pytest.raises(ValueError, match="Invert the image again"):
        other.reconstruct(back)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a pivot-edit inversion"):
        Inversion.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a pivot-edit inversion"):
        Inversion.load(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not found"):
        Inversion.load(tmp_path / "missing.safetensors")


def test_bad_options(editor):
    img = _scene(108).image
    with pytest.raises(ValueError, match="unknown inversion method"):
        editor.invert(img, "a red circle", inv_opts(method="magic"))
    with pytest.raises(ValueError, match="steps"):
        editor.invert(img, "a red circle", inv_opts(steps=0))
    with pytest.raises(ValueError, match="empty"):
        editor.invert(img, "   ")


def test_any_size_and_aspect_is_resized_to_model_multiples(editor):
    img = Image.new("RGB", (200, 90), (200, 30, 30))
    inv = editor.invert(img, "a red square on a white background", inv_opts(method="ddim", steps=3),
                        progress=False)
    w, h = inv.image_size
    assert w % 16 == 0 and h % 16 == 0 and w * h <= editor.native_size**2
    assert w > h  # aspect kept
    f = editor.model.vae_scale_factor
    assert inv.z_T.shape[-2:] == (h // f, w // f)
    assert editor.reconstruct(inv, progress=False).size == (w, h)


@pytest.mark.parametrize("size,multiple,budget,want", [
    ((4000, 3000), 64, 512 * 512, (576, 448)),   # floored both sides: 576x384, 3:2 for 4:3
    ((3000, 4000), 64, 512 * 512, (448, 576)),
    ((512, 512), 64, 512 * 512, (512, 512)),
    ((192, 128), 16, 64 * 64, (80, 48)),         # floored: 64x48
    ((8000, 1000), 64, 512 * 512, (1344, 192)),  # floored: 1408x128, 11:1 for 8:1
])
def test_working_size_keeps_the_aspect_ratio_as_multiples_allow(size, multiple, budget, want):
    from editor.images import fit_size

    got = fit_size(*size, multiple=multiple, max_pixels=budget)
    assert got == want
    w, h = got
    assert w % multiple == 0 and h % multiple == 0 and w * h <= budget
    # never smaller nor more distorted than flooring both sides of the exact fit
    s = math.sqrt(budget / (size[0] * size[1]))
    fw, fh = (max(multiple, int(v * s) // multiple * multiple) for v in size)
    err = lambda a, b: abs(math.log(a / b) - math.log(size[0] / size[1]))  # noqa: E731
    assert w * h >= fw * fh and err(w, h) <= err(fw, fh)


def test_sync_every_changes_speed_not_result(editor):
    """Reading the stop mask every inner step (CPU default), every 4th or never gives the
    same embeddings: images that stopped are masked until the host looks."""
    a, b = _scene(103), scenes.sample(104, n_objects=2)
    runs = [invert_batch(editor.model, [a.image, b.image], [a.caption, b.caption],
                         inv_opts(steps=4, num_inner_steps=4, early_stop_epsilon=0.03, sync_every=k),
                         progress=False)
            for k in (1, 4, 0)]
    assert runs[0][0].stats["inner_steps"] != runs[0][1].stats["inner_steps"]  # mixed stops
    for other in runs[1:]:
        for want, got in zip(runs[0], other, strict=True):
            assert got.stats["inner_steps"] == want.stats["inner_steps"]
            assert torch.equal(got.uncond, want.uncond)
