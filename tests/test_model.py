"""Loading models and generating (editor/model.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from editor import Editor, GenerateOptions
from editor import loading as loading_mod
from editor.model import SD15, bundled_model_path, parse_dtype, resolve_model

MODEL_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_bundled_model_loads_with_facts_read_from_its_config(editor):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = editor.pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    assert editor.model_id == "shapes" and editor.is_bundled
    assert editor.device.type == "cpu" and editor.dtype == torch.float32
    m = editor.model
    assert m.vae_scale_factor == 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    assert editor.native_size == pipe.unet.config.sample_size * m.vae_scale_factor == 64
    assert m.max_tokens == 77
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert pipe.tokenizer.vocab_size == 49408
    sched = m.scheduler()
    assert isinstance(sched, DDIMScheduler) and sched is not m.scheduler()
    cfg = sched.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.prediction_type == "epsilon" and not cfg.clip_sample and not cfg.set_alpha_to_one
    assert len(editor.fingerprint) == 16
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_bundled_model_files_exist():
    folder = bundled_model_path()
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    assert not missing
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 30 * 2**20  # the size limit for committed weights


def test_installed_distribution_ships_the_model():
    """A regular ``pip install .`` lists the model under editor/assets/shapes and the files are
    there; an editable install maps ``editor.assets`` onto the source ``assets/`` folder."""
    # look in site-packages only: a build leaves pivot_edit.egg-info in the checkout too
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    dists = list(importlib.metadata.distributions(name="pivot-edit", path=paths))
    assert len(dists) == 1, f"pivot-edit installed {len(dists)} times in {paths}"
    dist = dists[0]
    record = {str(f).replace("\\", "/"): f for f in dist.files or []}
    if "editor/assets/shapes/model_index.json" in record:  # regular install
        for name in MODEL_FILES:
            entry = record.get(f"editor/assets/shapes/{name}")
            assert entry is not None, name
            assert Path(dist.locate_file(entry)).is_file(), name
    else:  # editable install
        spec = importlib.util.find_spec("editor.assets")
        assert spec is not None and spec.submodule_search_locations
        folder = Path(next(iter(spec.submodule_search_locations))) / "shapes"
        assert (folder / "model_index.json").is_file()
        assert folder.resolve() == bundled_model_path().resolve()


@pytest.mark.parametrize(
    ("name", "words"),
    [("no-such-model", "unknown model"), ("a/b/c", "unknown model"), ("", "model must be"),
     ("./no/such/folder", "does not exist")],
)
def test_bad_model_names(name, words):
    with pytest.raises(ValueError, match=words):
        Editor.from_pretrained(name, device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model folder.*model_index.json"):
        Editor.from_pretrained(str(tmp_path), device="cpu")


def test_folder_with_model_index_but_no_weights(tmp_path):
    shutil.copy(bundled_model_path() / "model_index.json", tmp_path)
    with pytest.raises(ValueError, match="could not load diffusers folder"):
        Editor.from_pretrained(str(tmp_path), device="cpu")


@pytest.mark.parametrize(("dtype", "words"), [("float16", "float16 is not supported on CPU"),
                                              ("int8", "unknown dtype")])
def test_bad_dtype(dtype, words):
    with pytest.raises(ValueError, match=words):
        Editor.from_pretrained("shapes", device="cpu", dtype=dtype)


def test_default_dtype_is_fp32_on_cpu():
    assert parse_dtype(None, torch.device("cpu")) == torch.float32


def test_uncached_hub_id_offline_names_the_cure(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as exc:
        Editor.from_pretrained("nobody-pivot-edit/not-a-cached-model", device="cpu")
    msg = str(exc.value)
    assert "nobody-pivot-edit/not-a-cached-model" in msg
    assert "HF_HUB_OFFLINE" in msg and "--model shapes" in msg and "local folder" in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no hub traceback


def test_auto_falls_back_to_the_bundled_model_with_a_notice(monkeypatch):
    monkeypatch.setattr(loading_mod, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(loading_mod, "_hub_reachable", lambda timeout=3.0: False)
    location, notice = resolve_model("auto")
    assert Path(location) == bundled_model_path()
    assert notice and SD15 in notice and "shapes" in notice


def test_auto_prefers_sd15_when_cached(monkeypatch):
    monkeypatch.setattr(loading_mod, "_hub_cached", lambda repo: repo == SD15)
    assert resolve_model("auto") == (SD15, None)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [("", "empty"), ("   \t ", "empty"), ("red " * 80, "too long: 82 tokens"), (None, "string")],
)
def test_bad_prompts(editor, prompt, words):
    with pytest.raises(ValueError, match=words):
        editor.generate(prompt, GenerateOptions(steps=2))


def test_bad_steps(editor):
    with pytest.raises(ValueError, match="steps"):
        editor.generate("a red circle on a white background", GenerateOptions(steps=0))


def test_longest_allowed_prompt_is_accepted(editor):
    prompt = "red " * 75  # 75 words + start + end = 77 tokens
    assert editor.check_prompt(prompt) == prompt.strip()


def test_generate_is_deterministic_per_seed_and_native_size(editor):
    p = "a blue square on a gray background"
    a = editor.generate(p, GenerateOptions(seed=11, steps=6))
    b = editor.generate(p, GenerateOptions(seed=11, steps=6))
    c = editor.generate(p, GenerateOptions(seed=12, steps=6))
    assert a.size == b.size == (editor.native_size, editor.native_size) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert np.abs(np.asarray(a, float) - np.asarray(c, float)).mean() > 1.0


def test_text_encoding_shape_follows_the_model(editor):
    emb = editor.model.encode_text(["a red circle", ""])
    assert emb.shape == (2, editor.model.max_tokens, editor.pipe.text_encoder.config.hidden_size)
