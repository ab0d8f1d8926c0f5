"""What SDXL null-text inversion should optimise: token rows alone, or the pooled row too.

Runs DDIM and null-text (pooled row optimised or kept) on the tiny random SDXL pipelines of
``tests/test_sdxl.py`` (scene 101, 64x64, guidance 7.5, 10 inner steps) and prints one JSON
line per model variant with PSNR (dB against the input) beside the VAE round trip. The
table in docs/sdxl.md is this output (raw: docs/results/sdxl_null_text.jsonl).

    python tools/measure_sdxl_null_text.py --out-scale 0.15 --proj-scale 0.25 [--zero-null]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from editor import InvertOptions, scenes
    from editor.images import psnr, to_tensor
    from editor.inversion import OPTIMIZE_POOLED  # noqa: F401 - the default being measured
    from tests.test_sdxl import tiny_sdxl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-scale", type=float, nargs="+", default=[0.15])
    ap.add_argument("--proj-scale", type=float, default=0.25)
    ap.add_argument("--zero-null", action="store_true", help="force_zeros_for_empty_prompt")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=101)
    a = ap.parse_args(argv)
    import editor.inversion as inv_mod

    sc = scenes.sample(a.seed, n_objects=1)
    for scale in a.out_scale:
        ed = tiny_sdxl(out_scale=scale, proj_scale=a.proj_scale, force_zeros=a.zero_null)
        m = ed.model
        row = {"out_scale": scale, "proj_scale": a.proj_scale, "zero_null": a.zero_null,
               "steps": a.steps, "scene": a.seed,
               "vae": psnr(m.decode_latents(m.encode_image(to_tensor(sc.image)))[0], sc.image)}
        for name, method, pooled in (("ddim", "ddim", True), ("null_text_tokens", "null-text", False),
                                     ("null_text_tokens_pooled", "null-text", True)):
            inv_mod.OPTIMIZE_POOLED = pooled
            t0 = time.perf_counter()
            inv = ed.invert(sc.image, sc.caption, InvertOptions(method=method, steps=a.steps),
                            progress=False)
            row[name] = round(psnr(ed.reconstruct(inv, progress=False), sc.image), 2)
            row[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        inv_mod.OPTIMIZE_POOLED = True
        row["vae"] = round(row["vae"], 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
