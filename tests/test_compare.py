"""Method comparison: ShapesBench ground truth, PIE-Bench reading, tables and grid.

``run_compare``'s bookkeeping is checked with a stub engine whose "edits" are
known (the exact ground truth, or no change at all), so the expected metrics
are known exactly; the real engine runs on the bundled model in
``test_shapes_bench_real_engine`` and on a PIE-Bench-shaped fixture through the
CLI in ``test_pie_bench_cli_real_engine``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editor import compare as C
from editor import metrics as M
from editor import scenes
from editor.cli import main as cli_main
from editor.images import image_hash
from editor.inversion import Inversion

# -- ShapesBench -------------------------------------------------------------------------------


def test_shapes_bench_ground_truth_is_exact():
    cases = C.shapes_bench(2, seed=3)
    assert [c.kind for c in cases] == ["color"] * 2 + ["shape"] * 2 + ["protected"] * 2
    assert len({c.id for c in cases}) == 6
    for c in cases:
        src, gt = np.asarray(c.image, int), np.asarray(c.ground_truth, int)
        changed = np.abs(src - gt).max(-1) > 0
        assert changed.any() and not (changed & ~c.edit_mask).any(), c.id  # the mask covers the edit
        assert scenes.check_image(c.ground_truth, c.target_scene).color_ok
        assert c.target == c.target_scene.caption() and c.prompt == c.source_scene.caption()
        diff = [(a, b) for a, b in zip(c.prompt.split(), c.target.split(), strict=True) if a != b]
        assert len(diff) == 1  # a one-word swap
        o_src, o_tgt = c.source_scene.objects[c.index], c.target_scene.objects[c.index]
        if c.kind == "shape":
            assert o_src.shape != o_tgt.shape and o_src.color == o_tgt.color
        else:
            assert o_src.color != o_tgt.color and o_src.shape == o_tgt.shape
        if c.kind == "protected":
            assert c.protect in c.prompt and c.protect in c.target
            assert not (c.protected_mask & c.edit_mask).any()
        else:
            assert c.protected_mask is None and c.protect is None
    assert [c.target for c in C.shapes_bench(2, seed=3)] == [c.target for c in cases]  # deterministic


def test_parse_config_and_defaults():
    cfg = C.parse_config("nti-06:method=null-text,cross_replace=0.6,leakage=none,steps=20,"
                         "self_replace=[0.1, 0.5]", {"guidance": 5.0})
    assert cfg.name == "nti-06" and cfg.method == "null-text"
    assert cfg.invert == {"guidance": 5.0, "steps": 20}
    assert cfg.edit == {"cross_replace": 0.6, "leakage": "none", "self_replace": [0.1, 0.5]}
    assert cfg.inversion_options() == {"method": "null-text", "guidance": 5.0, "steps": 20}
    with pytest.raises(ValueError, match="unknown method"):
        C.parse_config("x:method=magic")
    with pytest.raises(ValueError, match="key=value"):
        C.parse_config("x:steps")
    names = [c.name for c in C.default_configs(["ddim", "direct"], ["none", "replace"])]
    assert names == ["ddim+none", "ddim+replace", "direct+none", "direct+replace"]
    assert [c.name for c in C.default_configs()] == list(C.METHODS)


# -- PIE-Bench format ----------------------------------------------------------------------------


def test_rle_matches_pie_bench_decoder():
    # PIE-Bench's mask_decode: pairs (start, length) over the row-major flattened mask,
    # then the one-pixel border is set
    m = C.decode_rle([5, 3, 14, 100], (4, 5), border=False)
    assert m.ravel().nonzero()[0].tolist() == [5, 6, 7, 14, 15, 16, 17, 18, 19]  # clipped at the end
    b = C.decode_rle([], (4, 5))
    assert b.sum() == 4 * 5 - 2 * 3 and not b[1:-1, 1:-1].any()
    rng = np.random.default_rng(0)
    mask = rng.random((32, 32)) > 0.7
    assert (C.decode_rle(C.encode_rle(mask), (32, 32), border=False) == mask).all()
    with pytest.raises(ValueError, match="pairs"):
        C.decode_rle([1, 2, 3])


def make_pie_fixture(root: Path, n: int = 2) -> list[scenes.SampledScene]:
    """A tiny PIE-Bench-shaped folder: mapping_file.json + annotation_images/<type>/<id>.jpg,
    512x512 images (scenes scaled up), bracketed prompts, RLE masks, blended words."""
    entries, samples = {}, []
    for i in range(n):
        s = scenes.sample(500 + i, n_objects=1, colors=("red",), background="white")
        samples.append(s)
        rel = f"{i}_random_{i}/{i:012d}.jpg"
        (root / "annotation_images" / rel).parent.mkdir(parents=True, exist_ok=True)
        s.image.resize((512, 512), Image.Resampling.NEAREST).save(root / "annotation_images" / rel,
                                                                   quality=95)
        big = np.asarray(Image.fromarray((s.masks[0] > 0.5).astype(np.uint8) * 255).resize(
            (512, 512), Image.Resampling.NEAREST)) > 0
        shape = s.scene.objects[0].shape
        entries[f"{i:012d}"] = {
            "image_path": rel,
            "original_prompt": f"a [red] {shape} on a white background",
            "editing_prompt": f"a [blue] {shape} on a white background",
            "editing_instruction": f"Make the {shape} blue",
            "editing_type_id": str(i % 2 + 1),
            "blended_word": "red blue",
            "mask": C.encode_rle(big),
        }
    (root / "mapping_file.json").write_text(json.dumps(entries))
    return samples


def test_load_pie_bench(tmp_path):
    samples = make_pie_fixture(tmp_path, 3)
    cases = C.load_pie_bench(tmp_path)
    assert [c.id for c in cases] == ["000000000000", "000000000001", "000000000002"]
    c = cases[0]
    shape = samples[0].scene.objects[0].shape
    assert c.prompt == f"a red {shape} on a white background" and c.target.startswith("a blue")
    assert c.kind == "pie-1" and c.image.size == (512, 512) and c.edit_mask.shape == (512, 512)
    assert c.edit_options == {"blend_words": ["red", "blue"], "reweight": {"blue": 2.0}}
    inner = c.edit_mask[1:-1, 1:-1]
    assert 0 < inner.mean() < 0.5 and c.edit_mask[0].all()  # object plus PIE's border
    assert [c.id for c in C.load_pie_bench(tmp_path, types=["2"])] == ["000000000001"]
    assert len(C.load_pie_bench(tmp_path, limit=2)) == 2
    with pytest.raises(ValueError, match="no mapping_file.json"):
        C.load_pie_bench(tmp_path / "annotation_images")


# -- run_compare with a stub engine ------------------------------------------------------------


@dataclass
class FakeResult:
    image: Image.Image
    source: Image.Image


#: The stub's behaviour, chosen by the configuration's ``cross_replace`` (a real option, so
#: configurations stay valid): the ground truth, the source unchanged, or a refusal.
TRUTH, SOURCE, REFUSE = 0.1, 0.2, 0.3


class FakeEditor:
    """Inverts by remembering the image; ``cross_replace`` picks what an "edit" returns."""

    model_id, fingerprint, native_size, arch = "fake", "0" * 16, 64, "sd"

    def __init__(self, truth: dict[str, Image.Image]):
        self.truth, self.images, self.batches = truth, {}, []

    def invert_batch(self, images, prompts, options, progress=True):
        self.batches.append(len(images))
        out = []
        for img in images:
            self.images[image_hash(img)] = img
            out.append(Inversion(prompt=prompts[0], method=options.method, steps=1, guidance=7.5,
                                 z_T=torch.zeros(1, 1, 1, 1), uncond=torch.zeros(1, 1, 1), timesteps=[1],
                                 image_size=img.size, model_id="fake", model_fingerprint=self.fingerprint,
                                 image_hash=image_hash(img), stats={"seconds": 0.5}))
        return out

    def edit(self, inv, target, options, progress=True):
        src = self.images[inv.image_hash]
        if options.cross_replace == REFUSE:
            raise ValueError("refused on purpose")
        return FakeResult(self.truth[target] if options.cross_replace == TRUTH else src, src)


def test_run_compare_metrics_tables_and_grid(tmp_path):
    cases = C.shapes_bench(1, seed=1)
    fake = FakeEditor({c.target: c.ground_truth for c in cases})
    configs = [C.Config("perfect", "ddim", edit={"cross_replace": TRUTH}),
               C.Config("no-op", "ddim", edit={"cross_replace": SOURCE}),
               C.Config("broken", "direct", edit={"cross_replace": REFUSE})]
    rep = C.run_compare(fake, cases, configs, tmp_path, progress=False)
    assert fake.batches == [3, 3]  # one batched inversion per distinct inversion setting
    summ = {s["config"]: s for s in rep.summary()}
    p, n, b = summ["perfect"], summ["no-op"], summ["broken"]
    assert p["edit_acc"] == 1.0 and p["bg_psnr"] is not None and p["protected_kept"] == 1.0
    assert n["edit_acc"] == 0.0 and n["acc_color"] == 0.0 and n["acc_shape"] == 0.0
    assert b["failed"] == 3 and b["edit_acc"] == 0.0
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 9
    perfect = [r for r in rows if r["config"] == "perfect"]
    # the ground truth equals the source outside the edit mask and is the ground truth
    assert all(r["bg_psnr"] == "inf" and r["gt_psnr"] == "inf" and r["edit_ok"] == "True" for r in perfect)
    assert all(float(r["recon_psnr"]) == math.inf for r in perfect)
    assert all(r["status"] == "failed" and "refused" in r["error"] for r in rows if r["config"] == "broken")
    md = (tmp_path / "summary.md").read_text()
    assert "| perfect | 100% |" in md and "| broken (3 failed) | 0% |" in md and "refused on purpose" in md
    assert (tmp_path / "raw/perfect/color-0.png").is_file()
    assert (tmp_path / "raw/no-op/color-0.source.png").is_file()
    grid = Image.open(tmp_path / "grid.png")
    # 3 rows x (input + truth + 3 configurations) cells of 128 px, plus labels
    assert grid.width > 5 * 128 and grid.height > 3 * 128
    assert np.asarray(grid).std() > 10

    # a rerun takes every inversion from the disk cache
    fake2 = FakeEditor(fake.truth)
    fake2.images = fake.images
    C.run_compare(fake2, cases, configs[:1], tmp_path / "again", progress=False)
    assert fake2.batches == [3]
    fake3 = FakeEditor(fake.truth)
    fake3.images = fake.images
    C.run_compare(fake3, cases, configs[:1], tmp_path, progress=False)
    assert fake3.batches == []


def test_run_compare_rejects_bad_setups(tmp_path):
    cases = C.shapes_bench(1)
    with pytest.raises(ValueError, match="unique"):
        C.run_compare(FakeEditor({}), cases, [C.Config("a"), C.Config("a")], tmp_path)
    with pytest.raises(ValueError, match="no configurations"):
        C.run_compare(FakeEditor({}), cases, [], tmp_path)


def test_cli_compare_manifest_with_custom_configs(tmp_path, capsys, monkeypatch):
    cases = C.shapes_bench(1)
    for c in cases[:2]:
        c.image.save(tmp_path / f"{c.id}.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(
        {"id": c.id, "image": f"{c.id}.png", "prompt": c.prompt, "edits": [c.target]}) for c in cases[:2]))
    monkeypatch.setattr("editor.cli.load_editor", lambda args: FakeEditor({}))
    rc = cli_main(["compare", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"),
                   "--config", f"same:method=ddim,cross_replace={SOURCE}",
                   "--config", f"bad:method=direct,cross_replace={REFUSE}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| same |" in printed and "| bad (2 failed) |" in printed
    rows = list(csv.DictReader((tmp_path / "o/metrics.csv").open()))
    assert [(r["case"], r["config"]) for r in rows] == [
        ("color-0-1", "same"), ("shape-0-1", "same"), ("color-0-1", "bad"), ("shape-0-1", "bad")]
    assert rows[0]["recon_psnr"] == "inf" and rows[0]["bg_psnr"] == ""  # no mask, no background


# -- the real engine -------------------------------------------------------------------------------


def test_shapes_bench_real_engine(editor, tmp_path):
    cases = C.shapes_bench(1, seed=0, size=editor.native_size)
    configs = C.default_configs(["ddim", "direct"], invert={"steps": 4})
    rep = C.run_compare(editor, cases, configs, tmp_path, progress=False)
    assert all(r.status == "ok" for r in rep.rows), [r.error for r in rep.rows]
    s = {x["config"]: x for x in rep.summary()}
    # direct inversion re-creates the input up to the VAE; plain DDIM inversion drifts
    assert s["direct"]["recon_psnr"] > s["ddim"]["recon_psnr"] + 2.0
    for x in s.values():
        assert {"edit_acc", "bg_psnr", "bg_ssim", "bg_mse", "protected_psnr", "recon_ssim"} <= set(x)
        assert 10 < x["bg_psnr"] < 80
    assert (tmp_path / "grid.png").is_file()


def test_pie_bench_cli_real_engine(tmp_path, capsys):
    make_pie_fixture(tmp_path / "pie", 2)
    out = tmp_path / "out"
    rc = cli_main(["compare", "--pie-bench", str(tmp_path / "pie"), "--out", str(out), "--model", "shapes",
                   "--methods", "ddim", "--steps", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ddim |" in printed and "grid:" in printed
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["000000000000", "000000000001"]
    assert all(r["status"] == "ok" for r in rows), rows
    # PIE-Bench convention: background metrics over the whole image with the edit region zeroed
    case = C.load_pie_bench(tmp_path / "pie")[0]
    edited = Image.open(out / "raw/ddim/000000000000.png")
    inp, bg = C._fit(case.image, edited.size), ~C._fit_mask(case.edit_mask, edited.size)
    assert float(rows[0]["bg_mse"]) == pytest.approx(M.mse(inp, edited, bg, convention="zero"), rel=1e-4)
    assert float(rows[0]["bg_mse"]) < M.mse(inp, edited, bg)
    md = (out / "summary.md").read_text()
    assert "convention 'zero'" in md and "structure distance" in md
    assert '"cross_replace": 0.4' in md  # PIE-Bench's published P2P settings
    # edits come back at the photo's own size (the fixture's 512x512), metrics read them there
    assert edited.size == case.image.size == (512, 512)
