"""Measure Prompt-to-Prompt edits on inverted generator scenes (prints JSON).

    python tools/measure_edits.py --method null-text --steps 50 \
        --cache /tmp/inversions --grid docs/images/p2p_grid.png > edits.json

Scenes are one-object generator scenes (:func:`editor.scenes.sample`, seeds from
``--seed``), inverted under their captions (inversions cached in ``--cache``).
Per scene and configuration:

- color swap (``red`` -> the next color): success = the checker reads the new color
  on the largest object; mask IoU = IoU of the edited object's mask
  (:func:`editor.scenes.object_mask`) with the source object's ground-truth mask;
- shape swap (``circle`` -> the next shape): success = new shape read by the checker,
  color kept, centroid within 4 px of the source's;
- background PSNR over pixels more than 1 px away from every object (source object
  and, for shape swaps, the ground-truth edited object), against the input image
  (``bg_psnr``) and against the run's own reconstruction (``bg_psnr_rec``);
- reweight (scenes ``--reweight-seed`` onwards, so they can be held out from the scenes
  used to choose the measure): the color word scaled by each of ``--scales`` (target =
  source prompt). Measure = "named-color share": the fraction of the source object's
  true mask whose pixels are object-colored (saturation > 0.45, value > 0.25) with the
  word's color as the nearest palette hue; monotonic if it never falls by more than
  ``MONOTONIC_TOL`` (1% of the object's pixels) as the scale grows (strictly
  non-decreasing is reported too). Also per scale: the shape read by the checker (kept
  = the source's shape) and the older "named-color amount" (image mean of saturation x
  ``max(0, cos(hue - the word's hue))**4``).
- reweight on the graded attribute (``--reweight-attr size``): scenes drawn with a size
  word (``scenes.sample(seed, n_objects=1, graded=1.0)``, small or big), the size word
  scaled. Measure = the object's area in pixels (``scenes.object_sizes``, the generator's
  graded quantity) signed by the word (``big``: larger is more of it; ``small``: smaller
  is); monotonic as above with a tolerance of 1% of the source object's area, and
  ``moved`` when the area changes by more than 5% of it over the scales.

``--model`` takes ``shapes`` (default) or a diffusers folder (a retrained bundled model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pragma: no cover - script use
    sys.path.insert(0, str(ROOT))

from editor import EditOptions, scenes  # noqa: E402
from editor.images import psnr  # noqa: E402

CAP = 99.0  # PSNR of identical pixels is infinite; JSON gets this instead
NEXT_COLOR = {"red": "blue", "blue": "yellow", "yellow": "green", "green": "red"}
NEXT_SHAPE = {"circle": "square", "square": "triangle", "triangle": "circle"}

#: name -> EditOptions fields
CONFIGS: dict[str, dict] = {
    "defaults": {},
    "recolor": {"self_replace": 1.0},
    "p2p_plain": {"blend_words": None},
    "p2p_word_blend": {"blend_words": "CHANGED", "blend_mask": "attention"},
    "p2p_word_blend_half": {"blend_words": "CHANGED", "blend_mask": "attention",
                            "blend_maps": "half"},
    "p2p_word_blend_0.9": {"blend_words": "CHANGED", "blend_mask": "attention",
                           "blend_threshold": 0.9},
    "noise_blend_latent_only": {"pixel_blend": False},
    "cross_0.6": {"cross_replace": 0.6},
    "cross_0.4": {"cross_replace": 0.4},
    "cross_0.2": {"cross_replace": 0.2},
    "recolor_cross_0.4": {"self_replace": 1.0, "cross_replace": 0.4},
    "blend_0": {"blend_start": 0.0},
    "blend_0.1": {"blend_start": 0.1},
    "noise_0.7": {"noise_threshold": 0.7},
    "noise_0.6": {"noise_threshold": 0.6},
    "noise_0.4": {"noise_threshold": 0.4},
    "noise_0.3": {"noise_threshold": 0.3},
    "recolor_noise_0.4": {"self_replace": 1.0, "noise_threshold": 0.4},
    "recolor_noise_0.3": {"self_replace": 1.0, "noise_threshold": 0.3},
}


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def largest(mask: np.ndarray) -> np.ndarray:
    comps = scenes._components(mask)
    return comps[0] if comps else np.zeros_like(mask)


MONOTONIC_TOL = 0.01


def named_color_share(img: Image.Image, color: str, mask: np.ndarray) -> float:
    """Fraction of ``mask`` whose pixels are object-colored (:func:`editor.scenes.object_mask`)
    and nearest ``color``'s hue among the palette's."""
    arr = np.asarray(img.convert("RGB"))
    hue = scenes._hsv(arr)[0]
    names = list(scenes.HUES)
    dist = np.stack([np.abs((hue - scenes.HUES[c] + 180.0) % 360.0 - 180.0) for c in names])
    hit = (dist.argmin(0) == names.index(color)) & scenes.object_mask(arr)
    return float(hit[mask].mean()) if mask.any() else 0.0


def monotonic(vals: list[float], tol: float = 0.0) -> bool:
    """Never falls by more than ``tol`` from one value to the next."""
    return all(b >= a - tol for a, b in zip(vals, vals[1:], strict=False))


def named_color_amount(img: Image.Image, color: str) -> float:
    """Image mean of saturation x max(0, cos(hue - the color's hue))**4."""
    arr = np.asarray(img.convert("RGB"))
    hue, sat, _ = scenes._hsv(arr)
    match = np.clip(np.cos(np.deg2rad(hue - scenes.HUES[color])), 0, None) ** 4
    return float((sat * match).mean())


def invert_cached(editor, samples, method: str, steps: int, cache: Path | None):
    from editor import InvertOptions
    from editor.inversion import Inversion

    out, todo = {}, []
    for seed, s in samples:
        f = cache / f"{method}_{steps}_{seed}.safetensors" if cache else None
        if f is not None and f.is_file():
            out[seed] = Inversion.load(f)
        else:
            todo.append((seed, s, f))
    if todo:
        invs = editor.invert_batch([s.image for _, s, _ in todo], [s.caption for _, s, _ in todo],
                                   InvertOptions(method=method, steps=steps), progress=False)
        for (seed, _, f), inv in zip(todo, invs, strict=True):
            out[seed] = inv
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                inv.save(f)
    return out


def measure(editor, *, seeds: list[int], n_shape: int, method: str, steps: int, configs: list[str],
            scales: list[float], n_reweight: int, cache: Path | None,
            reweight_seed: int | None = None, reweight_attr: str = "color") -> dict:
    samples = [(sd, scenes.sample(sd, n_objects=1)) for sd in seeds] if configs else []
    first = seeds[0] if reweight_seed is None else reweight_seed
    graded = 1.0 if reweight_attr == "size" else 0.0
    rw_samples = [(sd, scenes.sample(sd, n_objects=1, graded=graded))
                  for sd in range(first, first + n_reweight)]
    if graded:  # cached inversions are keyed by seed: keep graded scenes apart
        cache = cache / "graded" if cache else None
    t0 = time.perf_counter()
    invs = invert_cached(editor, list({sd: s for sd, s in samples + rw_samples}.items()),
                         method, steps, cache)
    t_inv = time.perf_counter() - t0
    rows = []
    grid_rows = []
    grid_cfgs = configs[:2]
    for idx, (seed, s) in enumerate(samples):
        obj = s.scene.objects[0]
        inv = invs[seed]
        src_mask = s.masks[0] > 0.5
        jobs = [("color", s.caption.replace(obj.color, NEXT_COLOR[obj.color], 1),
                 s.scene.with_object(0, color=NEXT_COLOR[obj.color]), obj.color, NEXT_COLOR[obj.color])]
        if idx < n_shape:
            jobs.append(("shape", s.caption.replace(obj.shape, NEXT_SHAPE[obj.shape], 1),
                         s.scene.with_object(0, shape=NEXT_SHAPE[obj.shape]), obj.shape,
                         NEXT_SHAPE[obj.shape]))
        for cfg in configs:
            kw = dict(CONFIGS[cfg])
            targets = [j[1] for j in jobs]
            if kw.get("blend_words") == "CHANGED":
                kw["blend_words"] = sorted({w for j in jobs for w in (j[3], j[4])})
            res = editor.edit_many(inv, targets, EditOptions.from_mapping(kw), progress=False)
            rec_psnr = psnr(res[0].source, s.image)
            if cfg == grid_cfgs[0] and len(grid_rows) < 6:
                grid_rows.append([s.image, res[0].source])
            if cfg in grid_cfgs and idx < 6:
                grid_rows[idx].extend(r.image for r in res)
            for (kind, target, want, _old, new), r in zip(jobs, res, strict=True):
                _, want_masks = want.render()
                bg = ~dilate(src_mask | (want_masks[0] > 0.5), 1)
                arr = np.asarray(r.image)
                chk = scenes.check_image(r.image, want)
                edited = largest(scenes.object_mask(arr))
                iou = float((edited & src_mask).sum() / max((edited | src_mask).sum(), 1))
                row = {
                    "seed": seed, "config": cfg, "kind": kind, "source": s.caption, "target": target,
                    "read_colors": chk.colors, "read_shapes": chk.shapes,
                    "bg_psnr": round(min(psnr(r.image, s.image, mask=bg), CAP), 2),
                    "bg_psnr_rec": round(min(psnr(r.image, r.source, mask=bg), CAP), 2),
                    "rec_psnr": round(rec_psnr, 2), "mask_iou": round(iou, 3),
                    "seconds": round(r.seconds, 2),
                }
                if kind == "color":
                    row["success"] = chk.colors[0] == new
                else:
                    c0, c1 = centroid(src_mask), centroid(edited)
                    moved = float(np.linalg.norm(c0 - c1)) if c1 is not None else 99.0
                    row.update(success=chk.shapes[0] == new, color_kept=chk.colors[0] == obj.color,
                               centroid_shift_px=round(moved, 2))
                rows.append(row)
    reweight = []
    for seed, s in rw_samples if reweight_attr == "size" else []:
        obj = s.scene.objects[0]
        src_area = float((s.masks[0] > 0.5).sum())
        imgs = [editor.edit(invs[seed], s.caption, EditOptions(reweight={obj.grade: sc}),
                            progress=False).image
                for sc in scales]
        area = [scenes.object_sizes(im, 1)[0] for im in imgs]
        sign = 1.0 if obj.grade == scenes.GRADES[-1] else -1.0
        signed = [sign * a for a in area]
        reweight.append({
            "seed": seed, "word": obj.grade, "color": obj.color, "shape": obj.shape,
            "scales": scales, "source_area": src_area, "area": area,
            "monotonic": monotonic(signed, 0.01 * src_area),
            "strictly_non_decreasing": monotonic(signed),
            "moved": bool(max(area) - min(area) > 0.05 * src_area),
            "read_shapes": [scenes.check_image(im, s.scene).shapes[0] for im in imgs],
        })
    for seed, s in rw_samples if reweight_attr == "color" else []:
        obj = s.scene.objects[0]
        src_mask = s.masks[0] > 0.5
        imgs = [editor.edit(invs[seed], s.caption, EditOptions(reweight={obj.color: sc}),
                            progress=False).image
                for sc in scales]
        share = [round(named_color_share(im, obj.color, src_mask), 4) for im in imgs]
        reweight.append({
            "seed": seed, "word": obj.color, "shape": obj.shape, "scales": scales,
            "named_color_share": share,
            "named_color_amount": [round(named_color_amount(im, obj.color), 4) for im in imgs],
            "read_shapes": [scenes.check_image(im, s.scene).shapes[0] for im in imgs],
            "monotonic": monotonic(share, MONOTONIC_TOL), "strictly_non_decreasing": monotonic(share),
        })
    return {"rows": rows, "reweight": reweight, "grid": grid_rows, "inversion_seconds": t_inv}


def summarize(rows: list[dict], reweight: list[dict]) -> dict:
    out: dict = {}
    for cfg in sorted({r["config"] for r in rows}):
        for kind in ("color", "shape"):
            sel = [r for r in rows if r["config"] == cfg and r["kind"] == kind]
            if not sel:
                continue
            d = {
                "n": len(sel),
                "success": round(float(np.mean([r["success"] for r in sel])), 3),
                "mask_iou_mean": round(float(np.mean([r["mask_iou"] for r in sel])), 3),
                "mask_iou_ge_0.8": round(float(np.mean([r["mask_iou"] >= 0.8 for r in sel])), 3),
                "bg_psnr_mean": round(float(np.mean([r["bg_psnr"] for r in sel])), 2),
                "bg_psnr_min": round(float(np.min([r["bg_psnr"] for r in sel])), 2),
                "bg_psnr_rec_mean": round(float(np.mean([r["bg_psnr_rec"] for r in sel])), 2),
            }
            if kind == "shape":
                d["color_kept"] = round(float(np.mean([r["color_kept"] for r in sel])), 3)
                d["centroid_shift_px_mean"] = round(float(np.mean([r["centroid_shift_px"] for r in sel])), 2)
                d["centroid_shift_px_max"] = round(float(np.max([r["centroid_shift_px"] for r in sel])), 2)
                d["success_with_color_and_position"] = round(float(np.mean(
                    [r["success"] and r["color_kept"] and r["centroid_shift_px"] <= 4 for r in sel])), 3)
            out[f"{cfg}/{kind}"] = d
    if reweight and "area" in reweight[0]:  # the graded attribute
        kept = np.array([[sh == r["shape"] for sh in r["read_shapes"]] for r in reweight])
        out["reweight_size"] = {
            "n": len(reweight), "scales": reweight[0]["scales"],
            "monotonic": round(float(np.mean([r["monotonic"] for r in reweight])), 3),
            "monotonic_count": int(sum(r["monotonic"] for r in reweight)),
            "monotonic_and_moved_count": int(sum(r["monotonic"] and r["moved"] for r in reweight)),
            "strictly_non_decreasing": round(float(np.mean(
                [r["strictly_non_decreasing"] for r in reweight])), 3),
            "area_over_source_mean": {w: [round(float(v), 3) for v in np.mean(
                [np.array(r["area"]) / max(r["source_area"], 1) for r in reweight
                 if r["word"] == w], axis=0)] for w in scenes.GRADES
                if any(r["word"] == w for r in reweight)},
            "shape_kept": [round(float(v), 3) for v in kept.mean(0)],
        }
    elif reweight:
        scales = reweight[0]["scales"]
        share = np.array([r["named_color_share"] for r in reweight])
        kept = np.array([[sh == r["shape"] for sh in r["read_shapes"]] for r in reweight])
        out["reweight"] = {
            "n": len(reweight), "scales": scales,
            "monotonic": round(float(np.mean([r["monotonic"] for r in reweight])), 3),
            "strictly_non_decreasing": round(float(np.mean(
                [r["strictly_non_decreasing"] for r in reweight])), 3),
            "named_color_share_mean": [round(float(v), 3) for v in share.mean(0)],
            "mean_monotonic": monotonic(list(share.mean(0))),
            "shape_kept": [round(float(v), 3) for v in kept.mean(0)],
        }
    recs = {(r["seed"]): r["rec_psnr"] for r in rows}
    if recs:
        out["reconstruction_psnr_mean"] = round(float(np.mean(list(recs.values()))), 2)
    return out


def save_grid(grid: list[list[Image.Image]], path: Path, scale: int = 2) -> None:
    """Rows: input, reconstruction, then each grid config's edits (NEAREST-upscaled)."""
    if not grid:
        return
    w, h = grid[0][0].size
    cols = max(len(r) for r in grid)
    out = Image.new("RGB", (cols * w * scale, len(grid) * h * scale), (255, 255, 255))
    for y, row in enumerate(grid):
        for x, im in enumerate(row):
            out.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST), (x * w * scale, y * h * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="null-text")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=100, help="first scene seed")
    ap.add_argument("--n-color", type=int, default=12, help="scenes (each gets a color swap)")
    ap.add_argument("--n-shape", type=int, default=8, help="of those, how many get a shape swap")
    ap.add_argument("--n-reweight", type=int, default=4)
    ap.add_argument("--reweight-seed", type=int, default=None,
                    help="first reweight scene seed (default: --seed)")
    ap.add_argument("--scales", type=float, nargs="+",
                    default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                    help="edit configurations (none: reweight only)")
    ap.add_argument("--cache", type=Path, default=None, help="folder for cached inversions")
    ap.add_argument("--grid", type=Path, default=None, help="write a picture grid PNG here")
    ap.add_argument("--rows", action="store_true", help="include per-edit rows in the JSON")
    ap.add_argument("--reweight-attr", choices=["color", "size"], default="color",
                    help="reweight the colour word, or the size word of graded scenes")
    ap.add_argument("--model", default="shapes", help="'shapes' or a diffusers folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from editor import Editor
    from editor.cli import quiet_libraries

    quiet_libraries()
    editor = Editor.from_pretrained(args.model, device=args.device)
    t0 = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.n_color))
    res = measure(editor, seeds=seeds, n_shape=args.n_shape, method=args.method, steps=args.steps,
                  configs=args.configs, scales=args.scales, n_reweight=args.n_reweight,
                  cache=args.cache, reweight_seed=args.reweight_seed,
                  reweight_attr=args.reweight_attr)
    if args.grid:
        save_grid(res["grid"], args.grid)
    out = {"method": args.method, "steps": args.steps, "seeds": seeds,
           "summary": summarize(res["rows"], res["reweight"]), "reweight": res["reweight"],
           "inversion_seconds": round(res["inversion_seconds"], 1),
           "seconds": round(time.perf_counter() - t0, 1)}
    if args.rows:
        out["rows"] = res["rows"]
    out["model"] = args.model
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
