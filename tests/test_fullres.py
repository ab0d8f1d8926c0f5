"""Photos at their own size, and masks the user draws (bundled model, generator scenes).

Scenes are drawn at 4x the model's size and at non-square sizes (``scenes.render_at``),
inverted at the model's pixel budget (DDIM, 10 steps: the compositing is under test, not
the inversion) and edited with ``original=``: the result has the original's size, every
pixel outside the edit's mask grown by the documented border is the original's pixel, and
the edit's colour is read as often as at the working size.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from editor import EditOptions, InvertOptions, scenes
from editor.compose import border_px, full_resolution, load_mask
from editor.images import image_hash

OPTS = InvertOptions(method="ddim", steps=10)
NEXT = {"red": "blue", "blue": "yellow", "yellow": "green", "green": "red"}


def _grown(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by ``r`` pixels (written out here, independently of the engine)."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * r, w + 2 * r), bool)
    padded[r : r + h, r : r + w] = mask
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _largest_colour(img: Image.Image) -> str | None:
    comps = scenes._components(scenes.object_mask(np.asarray(img.convert("RGB"))))
    return scenes.classify_color(img, comps[0]) if comps else None


def _upscaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = Image.fromarray((mask * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(m) > 127


@pytest.mark.parametrize("size", [(256, 256), (256, 192), (300, 200)])
def test_full_size_edits_keep_every_pixel_outside_the_mask(editor, size):
    reads = {"full": 0, "native": 0}
    for seed in (101, 103, 105):
        sc = scenes.sample(seed, n_objects=1).scene
        image, _ = scenes.render_at(sc, *size)
        inv = editor.invert(image, sc.caption(), OPTS, progress=False)
        assert inv.image_size[0] * inv.image_size[1] <= editor.native_size**2
        color = sc.objects[0].color
        res = editor.edit(inv, sc.caption().replace(color, NEXT[color]), original=image,
                          progress=False)
        assert res.image.size == size and res.image_native.size == tuple(inv.image_size)
        assert res.options["full_resolution"]["kept_original_pixels"]
        px = border_px(size, res.image_native.size)
        assert res.options["full_resolution"]["border_px"] == px
        changed = (np.asarray(res.image) != np.asarray(image)).any(-1)
        outside = ~_grown(_upscaled(res.mask_image, size), 3 * px)  # grow px + ramp 2 px
        assert changed.any() and not (changed & outside).any()
        reads["full"] += _largest_colour(res.image) == NEXT[color]
        reads["native"] += _largest_colour(res.image_native) == NEXT[color]
    assert reads["full"] >= reads["native"] >= 2, reads  # read at least as often


def test_an_original_that_is_not_the_inverted_image_is_refused(editor):
    sc = scenes.sample(101, n_objects=1).scene
    image, _ = scenes.render_at(sc, 256, 256)
    inv = editor.invert(image, sc.caption(), OPTS, progress=False)
    other, _ = scenes.render_at(scenes.sample(102, n_objects=1).scene, 256, 256)
    with pytest.raises(ValueError, match="not the image this inversion was made from"):
        editor.edit(inv, sc.caption(), original=other, progress=False)
    assert image_hash(image) == inv.image_hash


def test_without_a_mask_the_upscaled_edit_is_returned_and_says_so(editor):
    sc = scenes.sample(101, n_objects=1).scene
    image, _ = scenes.render_at(sc, 192, 192)
    inv = editor.invert(image, sc.caption(), OPTS, progress=False)
    res = editor.edit(inv, sc.caption(), EditOptions(blend_words=None), original=image,
                      progress=False)
    assert res.image.size == (192, 192) and res.mask_image is None
    assert res.options["full_resolution"]["kept_original_pixels"] is False
    assert "no pixel of the original is kept" in res.options["notice"]


@pytest.fixture(scope="module")
def two_objects(editor):
    s = scenes.sample(70_003, n_objects=2)
    inv = editor.invert(s.image, s.caption, OPTS, progress=False)
    return s, inv


def test_a_user_mask_confines_the_edit_bit_for_bit(editor, two_objects):
    """A mask over the first object: editing its colour changes nothing outside the mask
    and the object takes the new colour; editing the second object's colour under the same
    mask changes nothing outside it either."""
    s, inv = two_objects
    first, second = s.scene.objects
    mask = _grown(s.masks[0] > 0.5, 2)
    outside = ~mask
    used = {first.color, second.color}
    new1 = next(c for c in NEXT.values() if c not in used)
    res = editor.edit(inv, s.caption.replace(first.color, new1, 1), mask=mask, progress=False)
    native, recon = np.asarray(res.image_native), np.asarray(res.source)
    assert np.array_equal(native[outside], recon[outside])  # the reconstruction's, exactly
    assert scenes.classify_color(res.image, s.masks[0] > 0.5) == new1
    assert res.options["user_mask"] and res.options["mask_mode"] == "user"
    new2 = next(c for c in NEXT.values() if c not in used | {new1})
    other = editor.edit(inv, s.caption.replace(second.color, new2), mask=mask, progress=False)
    assert np.array_equal(np.asarray(other.image_native)[outside], recon[outside])
    assert scenes.classify_color(other.image, s.masks[1] > 0.5) == second.color


def test_mask_modes_combine_with_the_automatic_mask(editor, two_objects):
    s, inv = two_objects
    first = s.scene.objects[0]
    target = s.caption.replace(first.color, "green" if first.color != "green" else "red", 1)
    auto = editor.edit(inv, target, progress=False).mask_image > 0.5
    half = np.zeros_like(auto)
    half[:, : half.shape[1] // 2] = True
    got = {m: editor.edit(inv, target, EditOptions(mask_mode=m), mask=half,
                          progress=False).mask_image > 0.5
           for m in ("user", "intersect", "union")}
    assert np.array_equal(got["user"], half)
    assert np.array_equal(got["intersect"], auto & half)
    assert np.array_equal(got["union"], auto | half)


def test_bad_masks_are_clear_errors(editor, two_objects, tmp_path):
    s, inv = two_objects
    with pytest.raises(ValueError, match="mask is empty"):
        editor.edit(inv, s.caption, mask=np.zeros((64, 64), bool), progress=False)
    junk = tmp_path / "mask.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        editor.edit(inv, s.caption, mask=junk, progress=False)
    with pytest.raises(ValueError, match="mask file not found"):
        editor.edit(inv, s.caption, mask=tmp_path / "missing.png", progress=False)
    with pytest.raises(ValueError, match="NaN"):
        load_mask(np.full((4, 4), np.nan, np.float32), (8, 8))
    res = editor.edit(inv, s.caption, mask=np.ones((640, 640), bool), progress=False)  # any size
    assert "covers the whole image" in res.options["notice"]


def test_a_brushed_mask_image_counts_its_strokes(tmp_path):
    """A mask painted on a transparent layer (the web app's brush) counts by its alpha;
    a black-and-white mask by its brightness."""
    layer = Image.new("RGBA", (40, 20), (255, 0, 128, 0))
    layer.paste((255, 0, 128, 200), (0, 0, 20, 20))
    m = load_mask(layer, (20, 10))
    assert (m[:, :9] > 0.5).all() and (m[:, 11:] < 0.5).all()
    bw = Image.new("L", (40, 20), 0)
    bw.paste(255, (20, 0, 40, 20))
    bw.save(tmp_path / "bw.png")
    m = load_mask(tmp_path / "bw.png", (20, 10))
    assert (m[:, 11:] > 0.5).all() and (m[:, :9] < 0.5).all()


def test_an_exif_rotated_jpeg_comes_back_upright_at_its_own_size(editor, tmp_path):
    sc = scenes.sample(101, n_objects=1).scene
    upright, _ = scenes.render_at(sc, 192, 256)  # portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores: landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    inv = editor.invert(path, sc.caption(), OPTS, progress=False)
    assert inv.image_size[1] > inv.image_size[0]  # inverted upright (portrait)
    color = sc.objects[0].color
    res = editor.edit(inv, sc.caption().replace(color, NEXT[color]), original=path,
                      progress=False)
    assert res.image.size == (192, 256)
    assert np.abs(np.asarray(res.image, float) - np.asarray(upright, float)).mean() < 12


def test_full_resolution_keeps_the_originals_colour_profile():
    original = Image.new("RGB", (100, 80), (10, 20, 30))
    original.info["icc_profile"] = b"fake-icc-profile"
    edit = Image.new("RGB", (50, 40), (200, 0, 0))
    mask = np.zeros((40, 50), np.float32)
    mask[10:20, 10:20] = 1
    out, weight = full_resolution(original, edit, mask, return_weight=True)
    assert out.size == (100, 80) and out.info["icc_profile"] == b"fake-icc-profile"
    assert weight.max() == 1.0 and weight.min() == 0.0
    a = np.asarray(out)
    assert (a[weight == 0] == (10, 20, 30)).all() and (a[weight == 1] == (200, 0, 0)).all()


# -- the faces: CLI and batch ------------------------------------------------------------------


def test_cli_edit_at_full_size_with_a_mask(tmp_path, capsys):
    from editor.cli import main

    sc = scenes.sample(105, n_objects=1).scene
    image, masks = scenes.render_at(sc, 256, 256)
    image.save(tmp_path / "photo.png")
    mask = Image.fromarray(((masks[0] > 0.5) * 255).astype(np.uint8))
    mask.save(tmp_path / "mask.png")
    inv_path = tmp_path / "inv.safetensors"
    assert main(["invert", str(tmp_path / "photo.png"), "--prompt", sc.caption(), "--method",
                 "ddim", "--steps", "8", "--model", "shapes", "-o", str(inv_path)]) == 0
    out = capsys.readouterr()
    assert "reconstruction" in out.out and "dB" in out.out
    color = sc.objects[0].color
    target = sc.caption().replace(color, NEXT[color])
    assert main(["edit", str(inv_path), "--target", target, "--model", "shapes",
                 "-o", str(tmp_path / "native.png")]) == 0
    assert "--original auto" in capsys.readouterr().err  # the photo is still there: offered
    assert Image.open(tmp_path / "native.png").size == (64, 64)
    assert main(["edit", str(inv_path), "--target", target, "--model", "shapes", "--original",
                 "auto", "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "full.png")]) == 0
    full = np.asarray(Image.open(tmp_path / "full.png"))
    assert full.shape == (256, 256, 3)
    outside = ~_grown(masks[0] > 0.5, 3 * border_px((256, 256), (64, 64)) + 4)
    assert np.array_equal(full[outside], np.asarray(image)[outside])
    other = tmp_path / "other.png"
    scenes.render_at(scenes.sample(106, n_objects=1).scene, 256, 256)[0].save(other)
    assert main(["edit", str(inv_path), "--target", target, "--model", "shapes", "--original",
                 str(other), "-o", str(tmp_path / "x.png")]) == 2
    assert "not the image this inversion was made from" in capsys.readouterr().err
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (16, 16), 0).save(tmp_path / "empty.png")
    assert main(["edit", str(inv_path), "--target", target, "--model", "shapes", "--mask",
                 str(tmp_path / "empty.png"), "-o", str(tmp_path / "x.png")]) == 2
    assert "--mask is empty" in capsys.readouterr().err


def test_batch_writes_full_size_by_default_and_honours_masks_and_quality(editor, tmp_path):
    import json

    from editor.batch import read_manifest, run_batch

    sc = scenes.sample(103, n_objects=1).scene
    image, masks = scenes.render_at(sc, 192, 192)
    image.save(tmp_path / "a.png")
    Image.fromarray(((_grown(masks[0] > 0.5, 2)) * 255).astype(np.uint8)).save(tmp_path / "m.png")
    color = sc.objects[0].color
    target = sc.caption().replace(color, NEXT[color])
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"id": "a", "image": "a.png", "prompt": sc.caption(), "mask": "m.png",
         "edits": [target, {"target": target, "cross_replace": 0.6, "mask": None}]}))
    items = read_manifest(tmp_path / "m.jsonl")
    assert items[0].mask == tmp_path / "m.png"
    defaults = {"method": "ddim", "steps": 6}
    rep = run_batch(editor, items, tmp_path / "full", defaults=defaults, progress=False)
    rec = rep.records[0]
    assert rep.exit_status == 0 and rec.full_resolution and rec.reconstruction_psnr > 15
    out = np.asarray(Image.open(tmp_path / "full" / rec.outputs[0]))
    assert out.shape == (192, 192, 3)
    outside = ~_grown(_grown(masks[0] > 0.5, 2), 3 * border_px((192, 192), (64, 64)) + 4)
    assert np.array_equal(out[outside], np.asarray(image)[outside])
    rep = run_batch(editor, items, tmp_path / "native", defaults=defaults, native=True,
                    progress=False)
    assert Image.open(tmp_path / "native" / rep.records[0].outputs[0]).size == (64, 64)
    rep = run_batch(editor, items, tmp_path / "strict", defaults=defaults,
                    min_reconstruction_psnr=99.0, progress=False)
    rec = rep.records[0]
    assert rep.exit_status == 1 and "below --min-reconstruction-psnr 99" in rec.error
    assert rec.outputs == [] and [e["status"] for e in rec.edits] == ["not run", "not run"]
    summary = json.loads((tmp_path / "strict" / "summary.json").read_text())["items"][0]
    assert summary["reconstruction_psnr"] == rec.reconstruction_psnr
