"""Write the web app's example images: ``assets/examples/*.png`` + ``captions.json``.

Seeded procedural scenes (:func:`editor.scenes.sample`) the bundled model knows: one
object on each background, plus one two-object scene. Re-run to regenerate them:

    python tools/make_examples.py
"""

from __future__ import annotations

import json
from pathlib import Path

from editor import scenes

#: (seed, scene options): varied shapes, colours and backgrounds.
EXAMPLES: list[tuple[int, dict]] = [
    (1, {"n_objects": 1, "colors": ("red",), "shapes": ("circle",), "background": "white"}),
    (2, {"n_objects": 1, "colors": ("blue",), "shapes": ("square",), "background": "gray"}),
    (3, {"n_objects": 1, "colors": ("yellow",), "shapes": ("triangle",), "background": "black"}),
    (4, {"n_objects": 1, "colors": ("green",), "shapes": ("circle",), "background": "gray"}),
    (5, {"n_objects": 1, "colors": ("red",), "shapes": ("square",), "background": "black"}),
    (6, {"n_objects": 2, "colors": ("blue", "yellow"), "shapes": ("circle", "square"),
         "background": "white"}),
]


OUT = Path(__file__).resolve().parents[1] / "assets" / "examples"


def main(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for seed, opts in EXAMPLES:
        s = scenes.sample(seed, **opts)
        name = f"{seed:02d}-{'-'.join(o.phrase().replace(' ', '-') for o in s.scene.objects)}.png"
        s.image.save(out / name)
        captions[name] = s.caption
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    print(f"wrote {len(captions)} examples to {out}")


if __name__ == "__main__":
    main()
