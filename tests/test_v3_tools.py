"""Bundled model v3's tools (issue 18): the CLIP stage, the frozen-encoder UNet stage, the
attention measurement and the one GPU script (its smoke mode end to end is ``slow``)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from editor import Editor, scenes

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """A module of ``tools/`` (not installed); the checkout goes last on ``sys.path``."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    return importlib.import_module(f"tools.{name}")


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory) -> Path:
    """A tiny CLIP stage, then a tiny UNet on its frozen text encoder (2 steps each)."""
    out = tmp_path_factory.mktemp("v3")
    _tool("train_clip").main([
        "--out", str(out / "clip"), "--device", "cpu", "--workers", "1", "--dataset", "16",
        "--image-size", "32", "--tower-channels", "8,8,8,8", "--steps", "2", "--batch", "8",
        "--eval", "2", "--graded", "1.0"])
    _tool("train_shapes").main([
        "--out", str(out / "v3"), "--tokenizer-from", str(out / "clip" / "tokenizer"),
        "--text-from", str(out / "clip" / "text_encoder"), "--freeze-text",
        "--vae-from", str(ROOT / "assets" / "shapes"), "--device", "cpu", "--workers", "1",
        "--image-size", "32", "--unet-channels", "32,32,32", "--layers-per-block", "1",
        "--dataset", "8", "--unet-steps", "2", "--batch", "2", "--eval", "0",
        "--psnr-scenes", "2", "--graded", "1.0"])
    return out


def test_clip_stage_writes_encoder_towers_and_retrieval(tiny_v3):
    log = json.loads((tiny_v3 / "clip" / "clip_log.json").read_text())
    for k in ("color", "shape", "size", "binding_t2i", "binding_i2t"):
        assert 0.0 <= log["retrieval"][k] <= 1.0
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    towers = load_file(str(tiny_v3 / "clip" / "clip_towers.safetensors"))
    assert towers and not any(k.startswith("text.") for k in towers)
    assert {"text_proj.weight", "image_proj.weight", "logit_scale"} <= set(towers)
    text = CLIPTextModel.from_pretrained(tiny_v3 / "clip" / "text_encoder")
    assert text.config.num_hidden_layers == 4 and text.config.hidden_size == 64


def test_frozen_unet_stage_ships_the_clip_encoder_unchanged(tiny_v3):
    from safetensors.torch import load_file

    folder = tiny_v3 / "v3"
    log = json.loads((folder / "train_log.json").read_text())
    assert log["text_encoder"].startswith("frozen")
    assert log["captions"]["size_word"] == 1.0  # --graded 1.0: every caption has a size word
    src = load_file(str(tiny_v3 / "clip" / "text_encoder" / "model.safetensors"))
    shipped = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert set(src) == set(shipped)
    for k, v in src.items():  # shipped in fp16: equal up to the cast
        assert torch.equal(shipped[k], v.to(torch.float16)), k
    assert not list(folder.rglob("clip_towers*"))  # the image tower is not shipped
    ed = Editor.from_pretrained(str(folder), device="cpu")
    assert ed.native_size == 32


def test_measure_attention_rows_and_shares(editor):
    ma = _tool("measure_attention")
    tok = editor.pipe.tokenizer
    sc = scenes.random_scene(np.random.default_rng(1), n_objects=2, shapes=("circle", "circle"))
    cap = sc.caption()
    ids = tok(cap, padding="max_length", max_length=editor.model.max_tokens).input_ids
    groups = ma.token_groups(ids, tok.eos_token_id)
    n_words = len(cap.split())
    assert groups["words"] == list(range(1, n_words + 1)) and groups["eos"] == [n_words + 1]
    assert len(groups["padding"]) == editor.model.max_tokens - n_words - 2
    first, second = (ma.word_rows(tok, cap, o) for o in sc.objects)
    words = cap.split()
    assert words[first["shape"][0] - 1] == words[second["shape"][0] - 1] == "circle"
    assert first["shape"] != second["shape"]  # the same word, read from its own object
    assert words[second["color"][0] - 1] == sc.objects[1].color
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    maps = torch.zeros(3, 8, 8)
    maps[1] = torch.from_numpy(mask.astype(np.float32)) * 0.3 + 0.01
    v, flat = ma.word_iou(maps, [1], mask, 0.5)  # a map on the object: IoU 1
    assert v == 1.0 and flat < 0.2
    v, flat = ma.word_iou(maps + 1.0, [1], mask, 0.5)  # a flat map covers everything
    assert v == mask.mean() and flat > 0.7
    res = ma.measure(editor, "noised", 1, 1, 6_000_000, timesteps=1)
    shares = res["shares"]
    assert abs(sum(shares[k] for k in ("bos", "words", "eos", "padding")) - 1.0) < 1e-4
    assert 0.5 < shares["padding_if_uniform"] < 1.0
    for key in ("single", "two"):
        assert 0.0 <= res[key]["iou_color_mean"] <= 1.0


def test_gpu_script_plan(tmp_path, capsys):
    v3 = _tool("train_v3_gpu")
    assert v3.main(["--out", str(tmp_path), "--device", "cuda", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [ln.split("]")[0].strip("[") for ln in lines]
    assert stages[:3] == ["clip", "unet", "attention"]
    assert [s for s in stages if s.startswith("remeasure:")] == [
        "remeasure:p2p", "remeasure:reweight_size", "remeasure:leakage",
        "remeasure:shapesbench", "remeasure:inversion_bench"]
    unet = lines[1]
    assert "--freeze-text" in unet and f"--text-from {tmp_path / 'clip' / 'text_encoder'}" in unet
    assert f"--out {tmp_path / 'shapes_v3'}" in unet and "--graded 0.3" in unet
    assert "joint" not in stages  # v2 is the GPU run's jointly trained reference


@pytest.mark.slow
def test_gpu_script_smoke_end_to_end(tmp_path):
    """Every stage of tools/train_v3_gpu.py at toy sizes on CPU (minutes under load)."""
    v3 = _tool("train_v3_gpu")
    assert v3.main(["--out", str(tmp_path), "--preset", "smoke", "--device", "cpu",
                    "--workers", "1"]) == 0
    for f in ("clip/clip_log.json", "shapes_v3/train_log.json", "joint/train_log.json",
              "results/attention.json", "results/p2p.json", "results/reweight_size.json",
              "results/leakage.json"):
        assert (tmp_path / f).is_file(), f
    att = json.loads((tmp_path / "results" / "attention.json").read_text())
    assert set(att["models"]) == {"joint", "frozen (v3)"}
    cmds = json.loads((tmp_path / "results" / "commands.json").read_text())
    assert all(c["rc"] == 0 for c in cmds)
