"""Write the README's example images and figure (reproducible; CPU, about a minute).

- ``assets/examples/*.png``: six generator scenes at 64x64 (one and two objects on each
  background) and ``assets/examples/examples.json`` with their captions.
- ``docs/images/samples.png``: top row the generator's ground truth, bottom row the
  bundled model's generation for the same caption (seed 0, 50 DDIM steps, guidance 7.5,
  not cherry-picked), upscaled with nearest-neighbour.

    python tools/make_readme_figures.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor import scenes  # noqa: E402
from editor.model import Editor  # noqa: E402

PLAN = [(1, "white"), (1, "gray"), (1, "black"), (2, "white"), (2, "gray"), (2, "black")]
SCALE, GAP = 3, 6


def main() -> None:
    examples = ROOT / "assets" / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    samples = [scenes.sample(900 + k, n_objects=n, background=bg) for k, (n, bg) in enumerate(PLAN)]
    index = []
    for s in samples:
        name = s.caption.removeprefix("a ").replace(" on a ", "_on_").replace(" and a ", "_and_")
        name = name.replace(" background", "").replace(" ", "_") + ".png"
        s.image.save(examples / name)
        index.append({"file": name, "caption": s.caption})
    (examples / "examples.json").write_text(json.dumps(index, indent=1) + "\n")

    editor = Editor.from_pretrained("shapes", device="cpu")
    generated = [editor.generate(s.caption, seed=0, steps=50, guidance=7.5) for s in samples]
    side = editor.native_size * SCALE
    grid = Image.new("RGB", (len(samples) * (side + GAP) + GAP, 2 * (side + GAP) + GAP), "white")
    for col, (s, g) in enumerate(zip(samples, generated, strict=True)):
        for row, img in enumerate((s.image, g)):
            big = img.resize((side, side), Image.Resampling.NEAREST)
            grid.paste(big, (GAP + col * (side + GAP), GAP + row * (side + GAP)))
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "samples.png", optimize=True)
    for s, g in zip(samples, generated, strict=True):
        c = scenes.check_image(g, s.scene)
        print(f"{s.caption!r}: color {'ok' if c.color_ok else 'wrong'}, "
              f"shape {'ok' if c.shape_ok else 'wrong'}")


if __name__ == "__main__":
    main()
