"""Write the README's figure ``docs/images/samples.png`` (reproducible; CPU, under a minute).

Six generator scenes (one and two objects on each background): top row the
generator's ground truth, bottom row the bundled model's generation for the same
caption (seed 0, 50 DDIM steps, guidance 7.5, not cherry-picked), upscaled with
nearest-neighbour. Prints the captions and what the checker read.

    python tools/make_readme_figures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor import (  # noqa: E402
    Editor,
    GenerateOptions,
    scenes,  # noqa: E402
)

# (objects, background, colours): single objects get one colour each for variety
PLAN = [(1, "white", ("red",)), (1, "gray", ("yellow",)), (1, "black", ("green",)),
        (2, "white", None), (2, "gray", None), (2, "black", None)]
SCALE, GAP = 3, 6


def main() -> None:
    samples = [scenes.sample(900 + k, n_objects=n, background=bg, colors=c)
               for k, (n, bg, c) in enumerate(PLAN)]
    editor = Editor.from_pretrained("shapes", device="cpu")
    generated = [editor.generate(s.caption, GenerateOptions(seed=0, steps=50, guidance=7.5)) for s in samples]
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
