"""Write ``docs/images/can_cannot.png``: what the bundled model can and cannot represent.

Two rows, each: the input, the bundled model's VAE round trip (the best any inversion
can do), the null-text reconstruction, and an edit. Top: a generator scene (a caption the
model knows, "red" -> "blue"). Bottom: a photo (``--photo``; the README's figure uses
scikit-image's ``data/chelsea.png``, Chelsea the cat, released CC0 by its author), under a
caption the model has never seen ("a cat" -> "a dog"). PSNRs go to
``docs/results/can_cannot.json``. CPU, a few minutes.

    python tools/make_can_cannot.py --photo chelsea.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor import EditOptions, Editor, InvertOptions, scenes  # noqa: E402
from editor.images import load_image, to_tensor  # noqa: E402
from editor.metrics import psnr  # noqa: E402

ROW_H, GAP, LABEL = 150, 6, 18


def _row(images: list[Image.Image]) -> list[Image.Image]:
    return [im.convert("RGB").resize((round(ROW_H * im.width / im.height), ROW_H),
                                     Image.Resampling.LANCZOS) for im in images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photo", required=True, help="a photograph (any size)")
    ap.add_argument("--caption", default="a cat sitting on a blanket")
    ap.add_argument("--target", default="a dog sitting on a blanket")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "can_cannot.png"))
    args = ap.parse_args()
    editor = Editor.from_pretrained("shapes", device="cpu")
    sc = scenes.sample(4242, n_objects=1, colors=("red",)).scene
    scene_img, _ = scenes.render_at(sc, 192, 128)
    cases = [("scene", scene_img, sc.caption(), sc.caption().replace("red", "blue")),
             ("photo", load_image(args.photo), args.caption, args.target)]
    rows, numbers = [], {}
    for name, image, caption, target in cases:
        inv = editor.invert(image, caption, InvertOptions(), progress=False)
        working = image.resize(tuple(inv.image_size), Image.Resampling.LANCZOS)
        vae = editor.model.decode_latents(editor.model.encode_image(to_tensor(working)))[0]
        recon = editor.reconstruct(inv, progress=False)
        edit = editor.edit(inv, target, EditOptions(), original=image, progress=False)
        numbers[name] = {"caption": caption, "target": target, "size": list(image.size),
                         "working_size": list(inv.image_size),
                         "vae_psnr": round(psnr(vae, working), 2),
                         "reconstruction_psnr": round(psnr(recon, working), 2)}
        rows.append(_row([image, vae, recon, edit.image]))
        print(name, numbers[name])
    labels = ["input", "VAE round trip", "null-text reconstruction", "edit"]
    width = max(sum(im.width for im in r) + GAP * (len(r) + 1) for r in rows)
    sheet = Image.new("RGB", (width, len(rows) * (ROW_H + LABEL + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    y = GAP
    for r in rows:
        x = GAP
        for label, im in zip(labels, r, strict=True):
            draw.text((x, y), label, fill="black")
            sheet.paste(im, (x, y + LABEL))
            x += im.width + GAP
        y += ROW_H + LABEL + GAP
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    res = ROOT / "docs" / "results" / "can_cannot.json"
    res.write_text(json.dumps(numbers, indent=1) + "\n")
    print("wrote", out, res)


if __name__ == "__main__":
    main()
