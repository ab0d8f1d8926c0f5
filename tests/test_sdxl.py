"""SDXL on tiny random-weight SDXL-shaped pipelines built from config (nothing downloaded).

The pipelines are ``StableDiffusionXLPipeline``s as diffusers' own tests build them: a UNet
with ``addition_embed_type="text_time"``, a ``CLIPTextModel`` and a
``CLIPTextModelWithProjection``, two tokenizers (the bundled CLIP tokenizer twice, the
second with SDXL's ``"!"`` padding token). The VAE and the first text encoder are the
bundled "shapes" model's (trained, so the VAE round trip is a meaningful ceiling); the UNet
and the second encoder are random.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from editor import EditOptions, Editor, InvertOptions, scenes
from editor import prompts as P
from editor.images import psnr, to_tensor
from editor.inversion import Inversion, ddim_pivots
from editor.model import Cond, bundled_model_path
from editor.sampling import denoise

PROMPT = "a red circle on a white background"


def tiny_sdxl(*, out_scale: float = 0.15, force_zeros: bool = False, seed: int = 0,
              proj_scale: float = 0.25) -> Editor:
    """A tiny SDXL pipeline (64 x 64 images, 16 x 16 latents, token rows 64 + 32 wide).

    ``out_scale`` shrinks the UNet's output layer: a smooth random model, so DDIM's
    eps(z_t) ~ eps(z_{t-1}) holds and inversion at guidance 1 round-trips; ``proj_scale``
    the second encoder's projection (the pooled row's size). ``force_zeros``: SDXL base's
    zero null; off by default, so the null starts from the empty prompt's encoding as on
    SD (docs/sdxl.md has both measured).
    """
    shapes = bundled_model_path()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), cross_attention_dim=64 + 32, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=32))
        with torch.no_grad():
            unet.conv_out.weight.mul_(out_scale)
            unet.conv_out.bias.zero_()
            text2.text_projection.weight.mul_(proj_scale)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(shapes / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(shapes / "text_encoder", dtype=torch.float32),
        text_encoder_2=text2,
        tokenizer=CLIPTokenizer.from_pretrained(shapes / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(shapes / "tokenizer", pad_token="!"),
        unet=unet, scheduler=DDIMScheduler.from_pretrained(shapes / "scheduler"),
        force_zeros_for_empty_prompt=force_zeros)
    return Editor.from_pipe(pipe, "tiny-sdxl")


@pytest.fixture(scope="module")
def xl() -> Editor:
    return tiny_sdxl()


@pytest.fixture(scope="module")
def scene() -> scenes.SampledScene:
    return scenes.sample(101, n_objects=1)


# -- the model's facts and conditioning ----------------------------------------------------------


def test_sdxl_facts_come_from_the_config(xl, editor):
    m = xl.model
    assert m.is_sdxl and m.arch == "sdxl" and not editor.model.is_sdxl
    assert editor.model.arch == "sd"
    assert m.text_widths == [64, 32] and sum(m.text_widths) == m.unet.config.cross_attention_dim
    assert m.native_size == 64 and m.max_tokens == 77
    c = m.encode([PROMPT, "a blue square"])
    assert isinstance(c, Cond) and c.tokens.shape == (2, 77, 96) and c.pooled.shape == (2, 32)
    assert torch.equal(m.encode_text([PROMPT]), c.tokens[:1])
    # the first block is the first encoder's penultimate hidden states, as diffusers does
    ids = m.tokenize([PROMPT])
    want = m.pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(c.tokens[:1, :, :64], want)
    # pooled: the second encoder's projected output
    ids2 = m.tokenize([PROMPT], m.pipe.tokenizer_2)
    assert torch.allclose(c.pooled[:1], m.pipe.text_encoder_2(ids2).text_embeds)
    assert m.time_ids((16, 12), 2).tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    # the null: the empty prompt's encoding, or zeros where the pipeline forces them
    assert torch.equal(m.null().tokens, m.encode([""]).tokens)
    z = tiny_sdxl(force_zeros=True).model.null()
    assert not z.tokens.any() and not z.pooled.any()


def test_eps_matches_the_sdxl_pipeline_unet_call(xl):
    """``Model.eps`` feeds the UNet what StableDiffusionXLPipeline feeds it."""
    m = xl.model
    c = m.encode([PROMPT])
    x = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    pipe = m.pipe
    time_ids = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), dtype=torch.float32,
                                      text_encoder_projection_dim=32)
    want = pipe.unet(x, 500, encoder_hidden_states=c.tokens,
                     added_cond_kwargs={"text_embeds": c.pooled, "time_ids": time_ids}).sample
    assert torch.equal(m.eps(x, 500, c), want)
    with pytest.raises(ValueError, match="pooled text embedding"):
        m.eps(x, 500, c.tokens)


def test_both_tokenizers_give_the_same_positions(xl):
    m = xl.model
    tok, tok2 = m.pipe.tokenizer, m.pipe.tokenizer_2
    assert tok.pad_token_id != tok2.pad_token_id  # SDXL's differ
    for prompt in (PROMPT, "A big, blueish-green square!", "two red circles and a triangle"):
        a, b = P.tokenize(tok, prompt), P.tokenize(tok2, prompt)
        assert len(a.ids) == len(b.ids) and a.word_tokens == b.word_tokens
        pa, pb = m.tokenize([prompt]), m.tokenize([prompt], tok2)
        n = len(a.ids)
        assert not torch.equal(pa[:, n:], pb[:, n:])  # padding: end token vs "!"
        same = [x == y for x, y in zip(a.ids, b.ids, strict=True)]
        # the one other difference: "!" in the text is the second tokenizer's padding token
        assert all(s or tok.convert_ids_to_tokens(x) == "!</w>" for s, x in zip(same, a.ids, strict=True))
        P.check_aligned(tok, tok2, prompt)
    assert not all(x == y for x, y in zip(P.tokenize(tok, "wow!").ids, P.tokenize(tok2, "wow!").ids,
                                          strict=True))

    other = CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer")
    other.add_tokens(["redcircle"])  # a tokenizer that splits a word otherwise
    with pytest.raises(ValueError, match="split the prompt .* differently"):
        P.check_aligned(tok, other, "a redcircle on a white background")


# -- inversion ----------------------------------------------------------------------------------


def test_ddim_inversion_round_trips_at_guidance_1():
    xl = tiny_sdxl(out_scale=0.05)  # smoother still, as tests/test_inversion.py's tiny model
    m = xl.model
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5
    cond = m.encode([PROMPT]).float()
    steps = 50
    pivots = ddim_pivots(m, z0, cond, steps, progress=False)
    inv = Inversion(prompt=PROMPT, method="ddim", steps=steps, guidance=1.0, z_T=pivots[-1],
                    uncond=cond.tokens, uncond_pooled=cond.pooled, arch="sdxl",
                    timesteps=m.timesteps(steps), image_size=(64, 64), model_id=xl.model_id,
                    model_fingerprint=xl.fingerprint, image_hash="x")
    back = denoise(m, inv, cond, progress=False)
    rel = (back - z0).norm() / z0.norm()
    assert rel < 0.05, f"relative round-trip error {rel:.3f}"
    assert (pivots[-1] - z0).norm() / z0.norm() > 0.5  # it did move


@pytest.mark.slow
def test_null_text_nears_the_vae_ceiling_and_beats_ddim(xl, scene):
    """Guidance 7.5, 10 steps: null-text within 1.5 dB of the VAE round trip, >= 3 dB
    above DDIM (measured: docs/sdxl.md)."""
    m = xl.model
    ceiling = psnr(m.decode_latents(m.encode_image(to_tensor(scene.image)))[0], scene.image)
    res = {}
    for method in ("ddim", "null-text"):
        inv = xl.invert(scene.image, scene.caption, InvertOptions(method=method, steps=10),
                        progress=False)
        res[method] = psnr(xl.reconstruct(inv, progress=False), scene.image)
    assert res["null-text"] >= ceiling - 1.5, (res, ceiling)
    assert res["null-text"] >= res["ddim"] + 3.0, (res, ceiling)


def test_methods_save_load_and_reconstruct(xl, scene, tmp_path):
    recons = {}
    for method in ("null-text", "negative-prompt", "direct"):
        inv = xl.invert(scene.image, scene.caption,
                        InvertOptions(method=method, steps=3, num_inner_steps=2,
                                      check_reconstruction=False), progress=False)
        assert inv.arch == "sdxl" and inv.uncond.shape[1:] == (77, 96)
        rows = 3 if method == "null-text" else 1
        assert inv.uncond.shape[0] == rows and inv.uncond_pooled.shape == (rows, 32)
        back = Inversion.load(inv.save(tmp_path / f"{method}.safetensors"))
        assert back.arch == "sdxl" and torch.equal(back.uncond_pooled, inv.uncond_pooled)
        a = xl.reconstruct(inv, progress=False)
        assert np.array_equal(np.asarray(a), np.asarray(xl.reconstruct(back, progress=False)))
        recons[method] = psnr(a, scene.image)
    neg = Inversion.load(tmp_path / "negative-prompt.safetensors")
    c = xl.model.encode([scene.caption])  # negative-prompt: the source prompt is the null
    assert torch.allclose(neg.uncond[0], c.tokens[0])
    assert torch.allclose(neg.uncond_pooled[0], c.pooled[0])
    assert recons["direct"] > 30, recons


def test_sd_inversion_is_refused_on_sdxl_and_back(xl, editor, scene):
    sd_inv = editor.invert(scene.image, scene.caption, InvertOptions(method="ddim", steps=2),
                           progress=False)
    with pytest.raises(ValueError, match="SD 1.x/2.x model .* SDXL model"):
        xl.reconstruct(sd_inv)
    with pytest.raises(ValueError, match="SD 1.x/2.x model .* SDXL model"):
        xl.edit(sd_inv, "a blue circle on a white background", progress=False)
    xl_inv = xl.invert(scene.image, scene.caption, InvertOptions(method="ddim", steps=2),
                       progress=False)
    with pytest.raises(ValueError, match="SDXL model .* SD 1.x/2.x model"):
        editor.reconstruct(xl_inv)


def test_inversion_files_check_the_pooled_row(xl, scene, tmp_path):
    from safetensors.torch import load_file, save_file

    inv = xl.invert(scene.image, scene.caption, InvertOptions(method="ddim", steps=2),
                    progress=False)
    path = inv.save(tmp_path / "xl.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    del tensors["uncond_pooled"]
    save_file(tensors, str(tmp_path / "nopooled.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="uncond_pooled.*missing"):
        Inversion.load(tmp_path / "nopooled.safetensors")
    tensors = load_file(str(path))
    tensors["uncond_pooled"] = torch.zeros(5, 32)
    save_file(tensors, str(tmp_path / "badshape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="uncond_pooled.*shape"):
        Inversion.load(tmp_path / "badshape.safetensors")


def test_fast_path_is_refused_explicitly_on_sdxl(xl, scene):
    with pytest.raises(ValueError, match="SD 1.x/2.x UNets only"):
        xl.invert(scene.image, scene.caption, InvertOptions(steps=2, fast="static-eager"),
                  progress=False)


# -- editing --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_inv(xl, scene) -> Inversion:
    return xl.invert(scene.image, scene.caption,
                     InvertOptions(method="null-text", steps=4, num_inner_steps=2,
                                   check_reconstruction=False), progress=False)


def _target(scene, new_color: str = "blue") -> str:
    color = scene.scene.objects[0].color
    return scene.caption.replace(color, new_color if color != new_color else "green")


def test_p2p_replace_and_refine_keep_the_source_row(xl, xl_inv, scene):
    """The source row is the reconstruction (batched with the targets: float noise only,
    >= 40 dB as tests/test_editing.py asks on SD)."""
    recon = xl.reconstruct(xl_inv, progress=False)
    target = _target(scene)
    bigger = scene.caption.replace("a ", "a big ", 1)
    for tgt, mode in ((target, "replace"), (bigger, "refine")):
        res = xl.edit(xl_inv, tgt, EditOptions(mode=mode), progress=False)
        assert res.options["mode"] == mode
        assert psnr(res.source, recon) >= 40.0, mode
        assert res.image.size == res.source.size == (64, 64)
        assert res.attention_maps and res.source_attention_maps
        # the target row changed (a random UNet's edit is faint: no size is asked of it)
        assert not np.array_equal(np.asarray(res.image), np.asarray(res.source)), mode


def test_reweight_blend_masks_and_leakage_controls_run(xl, xl_inv, scene):
    recon = xl.reconstruct(xl_inv, progress=False)
    target = _target(scene)
    new = target.split()[1]
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    cases = {
        "reweight": (target, EditOptions(mode="replace", reweight={new: 2.0})),
        "reweight-down": (target, EditOptions(mode="replace", reweight={new: 0.3})),
        "blend-words": (target, EditOptions(blend_words=[new])),
        "project": (target, EditOptions(protect=[new], leakage="project")),
        "replace-rows": (target, EditOptions(protect=[new], leakage="replace")),
        "both": (target, EditOptions(protect=[new], leakage="both")),
    }
    outs = {}
    for name, (tgt, o) in cases.items():
        res = xl.edit(xl_inv, tgt, o, progress=False)
        assert psnr(res.source, recon) >= 40.0, name
        outs[name] = np.asarray(res.image)
    res = xl.edit(xl_inv, target, EditOptions(), mask=mask, progress=False)
    outside = mask < 0.5
    diff = np.abs(np.asarray(res.image, float) - np.asarray(res.source, float)).max(axis=2)
    assert diff[outside].max() == 0, "a user mask keeps every pixel outside it"
    assert not np.array_equal(outs["project"], outs["replace-rows"])


def test_leakage_projection_acts_per_encoder_block(xl):
    from editor.embeddings import protect_embeddings

    m = xl.model
    prompt = "a red circle and a blue square on a white background"
    emb = m.encode_text([prompt])[0]
    out = protect_embeddings(m, prompt, emb, protect=["red circle"], mode="project")
    rows = P.tokenize(m.tokenizer, prompt).positions("red circle")
    changed = (out - emb).abs().sum(-1) > 0
    assert changed[rows].all() and int(changed.sum()) == len(rows)
    for lo, hi in ((0, 64), (64, 96)):  # both encoders' parts of the rows are touched
        assert (out[rows, lo:hi] - emb[rows, lo:hi]).abs().sum() > 0
    rep = protect_embeddings(m, prompt, emb, protect=["red circle"], mode="replace")
    alone = m.encode_text(["red circle"])[0]
    assert torch.allclose(rep[rows], alone[1:3])


def test_generate_runs_on_sdxl(xl):
    from editor import GenerateOptions

    img = xl.generate(PROMPT, GenerateOptions(steps=2, seed=3))
    assert img.size == (64, 64)


def test_fp16_sdxl_vae_is_upcast():
    """SDXL VAEs overflow in float16 (``force_upcast`` in their config): kept in float32."""
    xl = tiny_sdxl()
    pipe = xl.pipe
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    m = Editor.from_pipe(pipe, "tiny-sdxl-fp16-vae").model
    assert m.pipe.vae.dtype == torch.float32
    lat = m.encode_image(to_tensor(scenes.sample(5, n_objects=1).image))
    assert lat.dtype == torch.float32 and m.decode_latents(lat)[0].size == (64, 64)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl().pipe.save_pretrained(folder)
    return folder


def test_cli_invert_edit_reconstruct_with_an_sdxl_folder(tmp_path, capsys, editor, scene,
                                                         xl_folder):
    """The CLI on an SDXL diffusers folder (``--model FOLDER``): invert, edit, reconstruct;
    an SD inversion given to it is one line and exit status 2."""
    from PIL import Image

    from editor.cli import main

    folder = xl_folder
    img = tmp_path / "scene.png"
    scene.image.save(img)
    model = ["--model", str(folder), "--device", "cpu"]
    inv_path = tmp_path / "scene.safetensors"
    assert main(["invert", str(img), "--prompt", scene.caption, "--method", "null-text",
                 "--steps", "3", "-o", str(inv_path), *model]) == 0
    inv = Inversion.load(inv_path)
    assert inv.arch == "sdxl" and inv.uncond_pooled.shape == (3, 32)
    out = tmp_path / "edit.png"
    assert main(["edit", str(inv_path), "--target", _target(scene), "-o", str(out), *model]) == 0
    assert Image.open(out).size == (64, 64)
    rec = tmp_path / "rec.png"
    assert main(["reconstruct", str(inv_path), "-o", str(rec), *model]) == 0
    assert psnr(Image.open(rec).convert("RGB"), scene.image) > 25
    capsys.readouterr()
    sd_inv = editor.invert(scene.image, scene.caption, InvertOptions(method="ddim", steps=2),
                           progress=False).save(tmp_path / "sd.safetensors")
    assert main(["reconstruct", str(sd_inv), "-o", str(tmp_path / "x.png"), *model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SD 1.x/2.x model" in err[0] and "SDXL model" in err[0]


def test_batch_runs_on_an_sdxl_folder(tmp_path, capsys, scene, xl_folder):
    """``pivot-edit batch`` on an SDXL model: one image, two edits, through the manifest."""
    import json

    from editor.cli import main

    scene.image.save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "prompt": scene.caption,
                                    "edits": [_target(scene), _target(scene, "red")],
                                    "method": "negative-prompt", "steps": 3}) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "--out", str(out), "--model", str(xl_folder),
                 "--device", "cpu"]) == 0
    assert "1/1 item(s) ok" in capsys.readouterr().out
    assert len(list(out.rglob("*.png"))) >= 2


def test_web_app_handlers_invert_and_edit_on_sdxl(xl, tmp_path):
    """The web app's handlers (as tests/test_ui.py calls them) on an SDXL model."""
    from functools import partial

    from PIL import Image

    from ui import app

    def noop(*args, **kwargs):
        return None

    ctx = app.make_context(xl, tmp_path / "ui")
    path, caption = app.example_files()[0]
    recon, status, inv_path, _, session, _, _ = partial(app.invert_image, progress=noop)(
        ctx, path, caption, "null-text", 3, 7.5, None)
    assert "PSNR" in status and Inversion.load(inv_path).arch == "sdxl"
    target = caption.replace("red", "blue") if "red" in caption else caption + " and a red square"
    (before, after), gallery, maps, png, status, _, native_png = partial(
        app.edit_image, progress=noop)(ctx, target, 0.8, 0.4, True, "", "", "", "replace", 0.5,
                                       session)
    assert "Edited" in status and Image.open(native_png).size == (64, 64)
    assert [c for _, c in gallery] == [target] and maps
    assert "SDXL" in app.model_markdown(xl) or xl.model_id in app.model_markdown(xl)
