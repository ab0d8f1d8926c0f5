"""Loading what people hold (editor/loading.py, docs/models.md): single-file checkpoints, the
bundled config folders, pickle refusal, LoRA, memory options, the load options' faces."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from editor import Editor, GenerateOptions
from editor.loading import (
    apply_memory_options,
    bundled_config_path,
    bundled_model_path,
    inspect_single_file,
)
from editor.options import LoadOptions, LoraSpec

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a white background"
GEN = GenerateOptions(seed=3, steps=4)


@pytest.fixture(scope="module")
def to_single_file():
    """``tools/to_single_file.py`` (not installed; the checkout goes last on sys.path)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    return importlib.import_module("tools.to_single_file")


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory, to_single_file) -> Path:
    out = tmp_path_factory.mktemp("single") / "shapes.safetensors"
    assert to_single_file.main([str(bundled_model_path()), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def base_image(editor):
    return editor.generate(PROMPT, GEN)


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


# -- single-file checkpoints ---------------------------------------------------------------------


def test_single_file_round_trip_is_bit_identical(editor, shapes_file, base_image):
    """The bundled model written original-layout and loaded back with --config gives the same
    weights (so the same fingerprint: its inversions stay usable) and the same image."""
    ed = Editor.from_pretrained(str(shapes_file), device="cpu", config=str(bundled_model_path()))
    assert ed.model_id == str(shapes_file) and not ed.is_bundled
    assert ed.fingerprint == editor.fingerprint
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(editor.pipe, name).state_dict(), getattr(ed.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert ed.generate(PROMPT, GEN).tobytes() == base_image.tobytes()


def test_converted_file_has_the_original_layout(shapes_file):
    from safetensors import safe_open

    with safe_open(str(shapes_file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # level-0 upsampler
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert inspect_single_file(shapes_file).architecture == "sd1"


def test_wrong_architecture_names_the_cure(shapes_file):
    """Without --config the file is taken for SD 1.x (its keys) and the SD 1.5 config does not
    fit: the message says so and names --config."""
    with pytest.raises(ValueError, match=r"as SD 1\.x.*--config FOLDER") as exc:
        Editor.from_pretrained(str(shapes_file), device="cpu")
    assert "ignore_mismatched_sizes" not in str(exc.value)  # diffusers' advice does not apply


def test_prediction_type_override(shapes_file):
    ed = Editor.from_pretrained(str(shapes_file), device="cpu", config=str(bundled_model_path()),
                                prediction_type="v_prediction")
    assert ed.model.scheduler().config.prediction_type == "v_prediction"


def _header_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(("keys", "arch"), [
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, "sd1"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "cond_stage_model.model.ln_final.weight": (8,)}, "sd2"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, "sd2"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
      "conditioner.embedders.1.model.ln_final.weight": (8,)}, "sdxl"),
])
def test_architecture_detected_from_the_header(tmp_path, keys, arch):
    assert inspect_single_file(_header_file(tmp_path / "m.safetensors", keys)).architecture == arch


@pytest.mark.parametrize(("keys", "words"), [
    ({"foo.weight": (2,)}, "no model.diffusion_model"),
    ({"lora_unet_down_blocks_0.lora_down.weight": (2, 2)}, "LoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3),
      "cond_stage_model.transformer.x": (1,)}, "9 input channels"),
    ({"model.diffusion_model.out.0.weight": (8,),
      "conditioner.embedders.0.model.ln_final.weight": (8,)}, "refiner"),
])
def test_unknown_architecture_is_refused_with_config_hint(tmp_path, keys, words):
    path = _header_file(tmp_path / "m.safetensors", keys)
    with pytest.raises(ValueError, match="unknown architecture") as exc:
        Editor.from_pretrained(str(path), device="cpu")
    assert words in str(exc.value) and "--config FOLDER" in str(exc.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not a real pickle: opening it would fail differently")
    with pytest.raises(ValueError, match="pickle") as exc:
        Editor.from_pretrained(str(path), device="cpu")
    msg = str(exc.value)
    assert "run arbitrary code" in msg and ".safetensors" in msg and "weights_only=True" in msg
    with pytest.raises(ValueError, match="LoRA .* is a pickle file"):
        Editor.from_pretrained("shapes", device="cpu", loras=[str(path)])


@pytest.mark.parametrize(("name", "words"), [
    ("missing.safetensors", "does not exist"), ("notes.txt", "not a .safetensors checkpoint")])
def test_missing_file_and_wrong_extension(tmp_path, name, words):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("hello")
    with pytest.raises(ValueError, match=words):
        Editor.from_pretrained(str(tmp_path / name), device="cpu")


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        Editor.from_pretrained(str(bad), device="cpu")


def test_config_folder_cannot_choose_code(tmp_path, shapes_file):
    """--config may only describe SD / SDXL pipelines built from diffusers and transformers."""
    evil = tmp_path / "evil"
    shutil.copytree(bundled_config_path("sd15"), evil)
    index = json.loads((evil / "model_index.json").read_text())
    (evil / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    with pytest.raises(ValueError, match="describes a 'MyPipeline'"):
        Editor.from_pretrained(str(shapes_file), device="cpu", config=str(evil))
    (evil / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_lib", "UNet"]}))
    with pytest.raises(ValueError, match="comes from 'evil_lib'"):
        Editor.from_pretrained(str(shapes_file), device="cpu", config=str(evil))
    with pytest.raises(ValueError, match="no model_index.json"):
        Editor.from_pretrained(str(shapes_file), device="cpu", config=str(tmp_path))
    with pytest.raises(ValueError, match="only used with --model FILE.safetensors"):
        Editor.from_pretrained("shapes", device="cpu", config=str(evil))


# Published parameter counts (diffusers / transformers model cards and papers).
PARAMS = {
    ("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21-v", "unet"): 865_910_724, ("sd21-v", "text_encoder"): 340_387_840,
    ("sdxl-base", "unet"): 2_567_463_684, ("sdxl-base", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize(("folder", "component"), list(PARAMS))
def test_bundled_configs_build_the_published_models(folder, component):
    """The shipped configs (no weights) build models of the published sizes (on the meta
    device: nothing is allocated)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = bundled_config_path(folder)
    index = json.loads((path / "model_index.json").read_text())
    lib, cls_name = index[component]
    with init_empty_weights():
        if lib == "diffusers":
            cls = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL}[
                cls_name]
            model = cls.from_config(cls.load_config(path / component))
        else:
            cls = getattr(transformers, cls_name)
            model = cls(cls.config_class.from_pretrained(path / component))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[(folder, component)]


def test_bundled_config_tokenizers_use_the_clip_vocabulary():
    from editor.loading import _tokenizers

    for folder, pads in [("sd15", {"tokenizer": "<|endoftext|>"}),
                         ("sdxl-base", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})]:
        path = bundled_config_path(folder)
        toks = _tokenizers(path, json.loads((path / "model_index.json").read_text()))
        assert {k: t.pad_token for k, t in toks.items()} == pads
        assert all(t.vocab_size == 49408 and t.model_max_length == 77 for t in toks.values())


# -- LoRA ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_file(editor, tmp_path_factory) -> Path:
    """Random rank-4 LoRA on every attention projection of the bundled UNet, in the key
    layout diffusers' ``load_lora_weights`` reads (``unet.<module>.lora_A/B.weight``)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in editor.pipe.unet.named_modules():
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            out_f, in_f = m.weight.shape
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) / in_f**0.5
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(sd, str(path))
    return path


def test_lora_changes_output_at_scale_1_not_at_0_and_the_fingerprint(editor, lora_file,
                                                                     base_image):
    one = Editor.from_pretrained("shapes", device="cpu", loras=[f"{lora_file}:1"])
    assert _diff(one.generate(PROMPT, GEN), base_image) > 5.0
    assert one.fingerprint != editor.fingerprint
    zero = Editor.from_pretrained("shapes", device="cpu", loras=[f"{lora_file}:0"])
    assert zero.generate(PROMPT, GEN).tobytes() == base_image.tobytes()
    # recorded with its scale: an inversion made with a LoRA is refused without it
    assert len({zero.fingerprint, one.fingerprint, editor.fingerprint}) == 3
    # fused: no adapter layers are left
    assert not any("lora_" in k for k in one.pipe.unet.state_dict())


def test_inversion_made_with_a_lora_is_refused_without_it(editor, lora_file):
    from editor.inversion import Inversion

    one = Editor.from_pretrained("shapes", device="cpu", loras=[str(lora_file)])
    inv = Inversion(prompt="x", method="ddim", steps=2, guidance=1.0, z_T=torch.zeros(1, 4, 16, 16),
                    uncond=torch.zeros(1, 77, 64), timesteps=[501, 1], image_size=(64, 64),
                    model_id=one.model_id, model_fingerprint=one.fingerprint, image_hash="x")
    inv.check_model(one.model)
    with pytest.raises(ValueError, match="made with model"):
        inv.check_model(editor.model)


def test_lora_errors(tmp_path, lora_file):
    with pytest.raises(ValueError, match="LoRA file .* does not exist"):
        Editor.from_pretrained("shapes", device="cpu", loras=[str(tmp_path / "no.safetensors")])
    other = tmp_path / "other.safetensors"
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(4, 8),
               "unet.nowhere.lora_B.weight": torch.zeros(8, 4)}, str(other))
    with pytest.raises(ValueError, match="LoRA .*(matched no layer|does not fit)"):
        Editor.from_pretrained("shapes", device="cpu", loras=[str(other)])


@pytest.mark.parametrize(("text", "spec"), [
    ("a.safetensors", LoraSpec("a.safetensors", 1.0)),
    ("a.safetensors:0.5", LoraSpec("a.safetensors", 0.5)),
    ("C:/x/a.safetensors", LoraSpec("C:/x/a.safetensors", 1.0)),
    ("C:/x/a.safetensors:-1", LoraSpec("C:/x/a.safetensors", -1.0)),
    ({"path": "a.safetensors", "scale": 2}, LoraSpec("a.safetensors", 2.0)),
])
def test_lora_spec_parsing(text, spec):
    assert LoraSpec.parse(text) == spec


@pytest.mark.parametrize(("value", "words"), [
    ("a.safetensors:99", "must be in"), ("", "file path"), (3, "FILE or FILE:SCALE"),
    ({"path": "a", "weight": 1}, "unknown LoRA keys")])
def test_bad_lora_specs(value, words):
    with pytest.raises(ValueError, match=words):
        LoadOptions(loras=[value])


# -- memory options ------------------------------------------------------------------------------


def test_offload_on_cpu_is_a_clear_error():
    for mode in ("model", "sequential"):
        with pytest.raises(ValueError, match="on the CPU they are in main memory already"):
            Editor.from_pretrained("shapes", device="cpu", offload=mode)
    with pytest.raises(ValueError, match="unknown offload mode"):
        LoadOptions(offload="disk")


def test_model_offload_hooks_give_the_same_image(base_image):
    """``enable_model_cpu_offload`` with the CPU as its 'accelerator' (the hooks run, nothing
    moves): the engine's calls go through the hooks and the image is unchanged."""
    ed = Editor.from_pretrained("shapes", device="cpu")
    fp = ed.fingerprint
    apply_memory_options(ed.pipe, LoadOptions(offload="model"), torch.device("cpu"))
    ed.model.execution_device = torch.device("cpu")
    assert ed.generate(PROMPT, GEN).tobytes() == base_image.tobytes()
    assert ed.fingerprint == fp


def test_vae_slicing_and_tiling(editor):
    """Slicing decodes a batch one image at a time: the same pixels but for float rounding
    (batch-1 kernels sum in another order). Tiling: an image no larger than one tile (the
    VAE's sample_size, 64 px for the bundled model) decodes exactly as without it; a larger
    one in blended tiles, of the right size. (How close tiles are is the VAE's: the bundled
    VAE's 64-pixel tiles are its whole training size, so they differ visibly, 35 levels mean;
    docs/models.md.)"""
    ed = Editor.from_pretrained("shapes", device="cpu", vae_slicing=True, vae_tiling=True)
    assert ed.pipe.vae.use_slicing and ed.pipe.vae.use_tiling
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    ref = editor.model.decode_latents(small)
    sliced = ed.model.decode_latents(small)
    assert max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()
               for a, b in zip(sliced, ref, strict=True)) <= 1
    ed.pipe.vae.disable_slicing()
    assert [a.tobytes() for a in ed.model.decode_latents(small)] == [a.tobytes() for a in ref]
    tiled = ed.model.decode_latents(large)[0]
    assert tiled.size == (128, 128) and _diff(tiled, editor.model.decode_latents(large)[0]) > 0


# -- the faces map onto LoadOptions --------------------------------------------------------------


def test_cli_model_flags_map_onto_load_options(tmp_path):
    from editor.cli import add_model_args, load_options

    p = argparse.ArgumentParser()
    add_model_args(p, default="shapes")
    args = p.parse_args(["--model", "m.safetensors", "--config", "cfg", "--prediction-type",
                         "v_prediction", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors",
                         "--offload", "model", "--vae-tiling", "--vae-slicing", "--device",
                         "cuda", "--dtype", "float16"])
    assert load_options(args) == LoadOptions(
        model="m.safetensors", device="cuda", dtype="float16", config="cfg",
        prediction_type="v_prediction",
        loras=(LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0)),
        offload="model", vae_tiling=True, vae_slicing=True)
    assert load_options(p.parse_args([])) == LoadOptions(model="shapes")
    assert set(LoadOptions.names()) == {"model", "device", "dtype", "config", "prediction_type",
                                        "loras", "offload", "vae_tiling", "vae_slicing"}


# -- SDXL: a tiny random-weight SDXL-shaped pipeline, as diffusers' own tests build one -------


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editor.bench import sdxl_pipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=8 * 6 + 48, cross_attention_dim=32 + 48,
            norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                            norm_num_groups=8, sample_size=32)
        cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                   num_hidden_layers=3, vocab_size=49408, hidden_act="gelu", projection_dim=32,
                   max_position_embeddings=77)
        te = CLIPTextModel(CLIPTextConfig(**cfg))
        # the second encoder must be wider than the first, as in SDXL (768 vs 1280): diffusers'
        # single-file loader tells the two apart by their width
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg, "hidden_size": 48,
                                                            "projection_dim": 48}))
    pipe = sdxl_pipeline(unet, vae, te, te2)
    out = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(out)
    return out


def test_tiny_sdxl_single_file_round_trip(tiny_sdxl_folder, to_single_file, tmp_path):
    """A tiny random SDXL folder written original-layout (two text encoders: CLIP in HF
    layout, OpenCLIP with fused q/k/v) is recognised as SDXL, loads back through
    StableDiffusionXLPipeline.from_single_file with --config, with bit-identical weights and
    the same fingerprint as the folder (which loads as SDXL too)."""
    from diffusers import StableDiffusionXLPipeline

    from editor.model import Model

    path = tmp_path / "tiny-sdxl.safetensors"
    assert to_single_file.main([str(tiny_sdxl_folder), str(path)]) == 0
    assert inspect_single_file(path).architecture == "sdxl"
    folder = Model.load(LoadOptions(model=str(tiny_sdxl_folder), device="cpu"))
    single = Model.load(LoadOptions(model=str(path), device="cpu", config=str(tiny_sdxl_folder)))
    for m in (folder, single):
        assert isinstance(m.pipe, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = getattr(folder.pipe, name).state_dict()
        b = getattr(single.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert single.fingerprint == folder.fingerprint
    assert single.pipe.tokenizer_2.pad_token == "!"
    # without --config the bundled SDXL base config is tried, and does not fit: named
    with pytest.raises(ValueError, match=r"as SDXL base.*--config FOLDER"):
        Model.load(LoadOptions(model=str(path), device="cpu"))


def test_cli_generate_with_single_file_and_lora(shapes_file, lora_file, tmp_path, capsys,
                                                base_image):
    """The CLI end to end: --model FILE --config FOLDER gives the folder's image; --lora at
    scale 0 too; a pickle --model is one error line, exit 2."""
    from PIL import Image

    from editor.cli import main

    out = tmp_path / "a.png"
    argv = ["generate", PROMPT, "-o", str(out), "--device", "cpu", "--steps", "4", "--seed", "3",
            "--model", str(shapes_file), "--config", str(bundled_model_path()),
            "--lora", f"{lora_file}:0"]
    assert main(argv) == 0
    assert Image.open(out).convert("RGB").tobytes() == base_image.tobytes()
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"pickle")
    capsys.readouterr()
    assert main(["generate", PROMPT, "-o", str(tmp_path / "b.png"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivot-edit: error: ") and "pickle" in err[0]


def test_kohya_layout_lora_fuses_like_the_diffusers_layout(editor, lora_file, tmp_path):
    """The layout most LoRA files from model sites use (Kohya: ``lora_unet_<module_path>``,
    ``lora_down`` / ``lora_up`` and ``alpha``), converted by diffusers itself, fuses into the
    same weights as the diffusers layout (alpha = rank: scale 1)."""
    from safetensors.torch import load_file

    sd = load_file(str(lora_file))
    kohya = {}
    for key, t in sd.items():
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = t
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    a = Editor.from_pretrained("shapes", device="cpu", loras=[str(lora_file)])
    b = Editor.from_pretrained("shapes", device="cpu", loras=[str(path)])
    wa, wb = a.pipe.unet.state_dict(), b.pipe.unet.state_dict()
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert not torch.equal(wa["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           editor.pipe.unet.state_dict()[
                               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])


def test_offloaded_model_takes_the_plain_null_text_loop():
    ed = Editor.from_pretrained("shapes", device="cpu")
    apply_memory_options(ed.pipe, LoadOptions(offload="model"), torch.device("cpu"))
    ed.model.execution_device = torch.device("cpu")
    assert ed.fast_path("auto") is None and ed.fast_path(None) is None
    with pytest.raises(ValueError, match="loaded with --offload"):
        ed.fast_path("cuda-graph")


def test_web_app_model_line_names_the_loras(lora_file):
    pytest.importorskip("gradio")
    from ui.app import model_markdown

    ed = Editor.from_pretrained("shapes", device="cpu", loras=[f"{lora_file}:0.5"])
    text = model_markdown(ed)
    assert f"LoRA `{lora_file.name}` x 0.5" in text and ed.fingerprint in text


@pytest.mark.parametrize(("arch", "vpred", "given", "config", "want", "notice"), [
    ("sd1", None, None, None, None, False),
    ("sd2", None, None, None, "v_prediction", True),  # 768-v assumed, and said
    ("sd2", None, "epsilon", None, "epsilon", False),  # the user knows better
    ("sd2", None, None, "cfg", None, False),  # the user's config says
    ("sdxl", True, None, None, "v_prediction", False),  # the file says (a v_pred key)
])
def test_prediction_type_choice(arch, vpred, given, config, want, notice):
    from editor.loading import SingleFileFacts, choose_prediction_type

    got, note = choose_prediction_type(SingleFileFacts(arch, vpred),
                                       LoadOptions(prediction_type=given, config=config))
    assert got == want and bool(note) == notice
    if note:
        assert "--prediction-type epsilon" in note


def test_model_folder_cannot_choose_code(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(bundled_model_path(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_lib", "UNet"]}))
    with pytest.raises(ValueError, match="model folder .*comes from 'evil_lib'"):
        Editor.from_pretrained(str(folder), device="cpu")


def test_single_file_loads_in_the_asked_dtype(shapes_file):
    ed = Editor.from_pretrained(str(shapes_file), device="cpu", dtype="bfloat16",
                                config=str(bundled_model_path()))
    assert ed.dtype == torch.bfloat16 and ed.pipe.text_encoder.dtype == torch.bfloat16
