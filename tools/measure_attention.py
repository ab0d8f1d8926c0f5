"""Where does the UNet's cross-attention go? Padding share and word-map IoU (prints JSON).

For each model (``--model``: ``shapes`` or a diffusers folder), on held-out generator
scenes (seeds ``--seed`` onwards; one-object scenes, then two-object scenes from
``--seed + 100000``), the conditional branch's cross-attention probabilities are
collected through the engine's attention processors (:mod:`editor.attention`) in every
cross-attention layer, head and step:

- **Shares**: per key row, the attention summed over the layer's queries and heads
  (each layer call weighs the same, as ``tools/measure_leakage.py attention`` does), then
  normalised per scene: ``bos`` (row 0), ``words`` (the caption's tokens), ``eos`` (the
  first EOS row) and ``padding`` (every row after it); ``padding_if_uniform`` is the
  share attention spread evenly over all rows would give (the padding rows' count / 77).
- **Word maps**: per word, the maps of the down and up blocks (not the mid block, as
  P2P's local blend), averaged over heads, steps and layers (each map size upsampled
  bilinearly to the largest, then to the image), normalised by the map's maximum and
  thresholded at ``--threshold`` times it (default 0.5). IoU with the object's mask;
  ``hit`` = IoU >= ``--iou`` (default 0.5). Words: each object's colour and shape word.

Two modes (``--mode``, default both):

- ``generate``: text-to-image from the caption (``--steps`` DDIM steps, guidance
  ``--guidance``, seed = scene seed); the object's mask is the region the generator's
  checker reads in the generated image (``scenes.object_regions``; for two objects the
  left and the right one). An object that was not drawn has an empty mask (IoU 0).
- ``noised``: the real scene, VAE-encoded, noised to ``--timesteps`` evenly spread
  timesteps (fixed noise per scene), one conditional UNet call each (the latents an
  inversion-based edit runs on); the mask is the scene's exact mask (coverage > 0.5).

    python tools/measure_attention.py --model shapes --model v3 --n 32 --n-two 16 \\
        --out docs/results/attention_v3.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pragma: no cover - script use
    sys.path.insert(0, str(ROOT))

from editor import Editor, scenes  # noqa: E402
from editor.attention import (  # noqa: E402
    AttentionController,
    AttentionStore,
    attention_control,
    store_key,
)
from editor.embeddings import find_phrase  # noqa: E402


class Collector(AttentionController):
    """Adds up the conditional rows' cross-attention: per-row mass and per-size maps."""

    def __init__(self, cond_rows: int) -> None:
        super().__init__()
        self.cond_rows = int(cond_rows)
        self.mass: torch.Tensor | None = None  # cond_rows x tokens
        self.store = AttentionStore(set())  # per-size maps (its own wants() is not used)

    def wants(self, layer) -> bool:
        return layer.cross

    def __call__(self, probs: torch.Tensor, layer, heads: int) -> torch.Tensor:
        total = probs.shape[0] // heads
        p = probs.view(total, heads, *probs.shape[1:])[total - self.cond_rows :].float()
        m = p.sum(dim=(1, 2)) / p.shape[2]  # rows x tokens: summed over heads, mean over queries
        self.mass = m if self.mass is None else self.mass + m
        if not layer.mid:
            self.store.add(store_key(layer), p.mean(1))  # rows x q x tokens
        return probs

    def maps(self, size: int) -> torch.Tensor:
        """Mean map per row and token at ``size`` x ``size``: rows x tokens x size x size."""
        out = self.store.average()
        return F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)


def token_groups(ids: list[int], eos_id: int) -> dict[str, list[int]]:
    """Rows of BOS, the words, the first EOS and the padding after it."""
    eos = ids.index(eos_id, 1)
    return {"bos": [0], "words": list(range(1, eos)), "eos": [eos],
            "padding": list(range(eos + 1, len(ids)))}


def word_rows(tokenizer, caption: str, obj: scenes.SceneObject) -> dict[str, list[int]]:
    """Rows of an object's colour and shape words (inside its own phrase, so a shape named
    twice in a two-object caption is read from the right object)."""
    (span,) = find_phrase(tokenizer, caption, obj.phrase())[:1]
    words = obj.phrase().split()
    if len(span) != len(words):  # a word of several tokens: split the span by tokens
        pieces = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in words]
        starts = np.cumsum([0] + pieces)
        rows = {w: span[starts[i]:starts[i + 1]] for i, w in enumerate(words)}
    else:
        rows = {w: [r] for w, r in zip(words, span, strict=True)}
    return {"color": rows[obj.color], "shape": rows[obj.shape]}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def word_iou(maps: torch.Tensor, rows: list[int], mask: np.ndarray, threshold: float
             ) -> tuple[float, float]:
    """IoU of the word's thresholded map with ``mask``, and the map's flatness (mean / max:
    1 for a flat map, small for a peaked one)."""
    m = maps[rows].mean(0)
    m = (m / m.max().clamp_min(1e-12)).cpu().numpy()
    return iou(m >= threshold, mask), float(m.mean())


def _scenes(n: int, n_objects: int, seed: int, size: int) -> list[tuple[int, scenes.Scene]]:
    return [(seed + i, scenes.random_scene(np.random.default_rng(seed + i), size=size,
                                           n_objects=n_objects)) for i in range(n)]


@torch.no_grad()
def run_batch(editor: Editor, batch: list[tuple[int, scenes.Scene]], mode: str, *, steps: int,
              guidance: float, timesteps: int) -> tuple[Collector, list, list | None]:
    """Collect attention for one batch; return the collector and each scene's masks."""
    pipe, model = editor.pipe, editor.model
    size = model.native_size
    latent_hw = (size // model.vae_scale_factor,) * 2
    captions = [s.caption() for _, s in batch]
    if mode == "generate":
        col = Collector(len(batch))
        gens = [torch.Generator("cpu").manual_seed(seed) for seed, _ in batch]
        with attention_control(pipe.unet, col, latent_hw):
            imgs = pipe(captions, num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, height=size, width=size).images
        masks = [scenes.object_regions(img, len(s.objects)) for img, (_, s) in zip(imgs, batch,
                                                                                    strict=True)]
        return col, masks, imgs
    # noised real scenes: one conditional UNet call per timestep
    dev, dtype = model.device, pipe.unet.dtype
    rendered = [s.render() for _, s in batch]
    x = torch.from_numpy(np.stack([np.asarray(im) for im, _ in rendered])).permute(0, 3, 1, 2)
    x = (x.float() / 127.5 - 1).to(dev, dtype)
    z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    emb = model.encode_text(captions).to(dev, dtype)
    acp = pipe.scheduler.alphas_cumprod.to(dev)
    noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed))
                         for seed, _ in batch]).to(dev, dtype)
    ts = np.linspace(0, pipe.scheduler.config.num_train_timesteps, timesteps + 2)[1:-1].round()
    col = Collector(len(batch))
    with attention_control(pipe.unet, col, latent_hw):
        for t in ts.astype(int):
            a = acp[t].to(dtype)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            pipe.unet(zt, torch.full((len(batch),), int(t), device=dev), encoder_hidden_states=emb)
    masks = [[m > 0.5 for m in r[1]] for r in rendered]
    return col, masks, None


def measure(editor: Editor, mode: str, n: int, n_two: int, seed: int, *, steps: int = 50,
            guidance: float = 7.5, timesteps: int = 10, threshold: float = 0.5,
            hit_iou: float = 0.5, batch: int = 16) -> dict:
    tok = editor.pipe.tokenizer
    size = editor.model.native_size
    eos_id = tok.eos_token_id
    shares: dict[str, list[float]] = {"bos": [], "words": [], "eos": [], "padding": [],
                                      "padding_if_uniform": []}
    out: dict = {"mode": mode, "n_single": n, "n_two": n_two, "threshold": threshold,
                 "hit_iou": hit_iou, "image_size": size}
    if mode == "generate":
        out.update(steps=steps, guidance=guidance)
    else:
        out.update(timesteps=timesteps)
    for n_obj, count, first in ((1, n, seed), (2, n_two, seed + 100_000)):
        ious: dict[str, list[float]] = {"color": [], "shape": []}
        flat: list[float] = []
        hits, drawn = [], []
        cases = _scenes(count, n_obj, first, size)
        for b0 in range(0, count, batch):
            chunk = cases[b0 : b0 + batch]
            col, masks, imgs = run_batch(editor, chunk, mode, steps=steps, guidance=guidance,
                                         timesteps=timesteps)
            maps = col.maps(size)
            for j, (_, sc) in enumerate(chunk):
                cap = sc.caption()
                ids = tok(cap, padding="max_length", max_length=editor.model.max_tokens,
                          truncation=True).input_ids
                mass = col.mass[j] / col.mass[j].sum()
                for k, rows in token_groups(ids, eos_id).items():
                    shares[k].append(float(mass[rows].sum()))
                # what attention spread evenly over the rows would give
                shares["padding_if_uniform"].append(len(token_groups(ids, eos_id)["padding"])
                                                    / len(ids))
                scene_hit = True
                for o, obj in enumerate(sc.objects):
                    mask = np.asarray(masks[j][o], bool)
                    if imgs is not None:
                        drawn.append(bool(mask.any()))
                    for w, rows in word_rows(tok, cap, obj).items():
                        v, fl = word_iou(maps[j], rows, mask, threshold)
                        ious[w].append(v)
                        flat.append(fl)
                        scene_hit &= v >= hit_iou
                hits.append(scene_hit)
        key = "single" if n_obj == 1 else "two"
        if count:
            out[key] = {
                "iou_color_mean": float(np.mean(ious["color"])),
                "iou_shape_mean": float(np.mean(ious["shape"])),
                "hit_color": float(np.mean([v >= hit_iou for v in ious["color"]])),
                "hit_shape": float(np.mean([v >= hit_iou for v in ious["shape"]])),
                "hit_scene": float(np.mean(hits)),  # every word of every object hits
                "map_mean_over_max": float(np.mean(flat)),
            }
            if drawn:
                out[key]["object_drawn"] = float(np.mean(drawn))
    out["shares"] = {k: float(np.mean(v)) for k, v in shares.items() if v}
    return out


def markdown_table(result: dict) -> str:
    """The docs' table: one row per model and mode."""
    head = ("| model | mode | padding share | EOS | BOS | words | 1 obj: colour IoU | 1 obj: shape IoU "
            "| 1 obj: both words hit | 1 obj: map mean/max | 2 obj: colour IoU | 2 obj: shape IoU "
            "| 2 obj: all words hit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, entry in result["models"].items():
        for mode in ("generate", "noised"):
            r = entry.get(mode)
            if not r:
                continue
            sh, one, two = r["shares"], r.get("single", {}), r.get("two", {})

            def f(d, k, pct=False):
                return "-" if k not in d else (f"{100 * d[k]:.0f}%" if pct else f"{d[k]:.2f}")

            uni = f" (uniform {f(sh, 'padding_if_uniform', True)})" if "padding_if_uniform" in sh else ""
            lines.append(f"| {name} | {mode} | {f(sh, 'padding', True)}{uni} | {f(sh, 'eos', True)} | "
                         f"{f(sh, 'bos', True)} | {f(sh, 'words', True)} | "
                         f"{f(one, 'iou_color_mean')} | {f(one, 'iou_shape_mean')} | "
                         f"{f(one, 'hit_scene', True)} | {f(one, 'map_mean_over_max')} | "
                         f"{f(two, 'iou_color_mean')} | "
                         f"{f(two, 'iou_shape_mean')} | {f(two, 'hit_scene', True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="'shapes' or a diffusers folder; repeat to compare models")
    ap.add_argument("--name", action="append", default=None,
                    help="a label per --model (default: the model argument)")
    ap.add_argument("--mode", choices=["generate", "noised", "both"], default="both")
    ap.add_argument("--n", type=int, default=32, help="one-object scenes")
    ap.add_argument("--n-two", type=int, default=16, help="two-object scenes")
    ap.add_argument("--seed", type=int, default=6_000_000, help="first scene seed (held out)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--timesteps", type=int, default=10, help="noised mode: timesteps per scene")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="a word's map is binarised at this fraction of its maximum")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU that counts as a hit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--table", type=Path, default=None,
                    help="print the markdown table of this earlier JSON output and exit")
    args = ap.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        print(markdown_table(result))
        return result
    if not args.model:
        ap.error("give at least one --model (or --table JSON)")
    names = args.name or args.model
    if len(names) != len(args.model):
        ap.error("give one --name per --model")
    modes = ["generate", "noised"] if args.mode == "both" else [args.mode]
    result: dict = {"models": {}}
    for name, model in zip(names, args.model, strict=True):
        editor = Editor.from_pretrained(model, device=args.device)
        result["device"] = str(editor.device)
        entry: dict = {"model": model}
        for mode in modes:
            t0 = time.perf_counter()
            entry[mode] = measure(editor, mode, args.n, args.n_two, args.seed, steps=args.steps,
                                  guidance=args.guidance, timesteps=args.timesteps,
                                  threshold=args.threshold, hit_iou=args.iou, batch=args.batch)
            entry[mode]["seconds"] = round(time.perf_counter() - t0, 1)
        result["models"][name] = entry
        text = json.dumps(result, indent=1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    print(json.dumps(result, indent=1), flush=True)
    return result


if __name__ == "__main__":
    main()
