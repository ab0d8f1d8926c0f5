"""Measure the leakage controls (editor/embeddings.py) on the bundled model; prints JSON.

Two-object generator scenes (``scenes.sample(seed, n_objects=2)``), the second
object protected (its rows are the ones a causal encoder contaminates with the
first object's words).

- ``t2i``: generate from the caption with each control; count how often both
  objects get their own colors on their own sides (``scenes.check_image``).
- ``edit``: invert the scene, change the first object's color, protect the
  second; edit success (``classify_color`` on the first object's true mask) and
  the protected object's change (PSNR on its mask, hue shift in degrees).

    python tools/measure_leakage.py t2i --n 48 --steps 50
    python tools/measure_leakage.py edit --n 16 --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from editor import EditOptions, Editor, InvertOptions, scenes
from editor.embeddings import find_phrase, protect_embeddings, replace_rows
from editor.metrics import hue_shift

#: (name, mode, rows, extra kwargs) of every variant measured.
VARIANTS: list[tuple[str, str, str, dict]] = [
    ("none", "none", "item", {}),
    ("project", "project", "item", {}),
    ("project+end", "project", "item+end", {}),
    ("project-uncentered", "project", "item", {"center": False}),
    ("replace", "replace", "item", {}),
    ("replace+end", "replace", "item+end", {}),
    ("both", "both", "item", {}),
    ("both+end", "both", "item+end", {}),
]


@dataclass
class Case:
    seed: int
    sampled: scenes.SampledScene

    @property
    def protect(self) -> str:
        return self.sampled.scene.objects[1].phrase()


def cases(n: int, first_seed: int) -> list[Case]:
    return [Case(s, scenes.sample(s, n_objects=2)) for s in range(first_seed, first_seed + n)]


@torch.no_grad()
def generate_batch(editor: Editor, emb: torch.Tensor, seeds: list[int], steps: int,
                   guidance: float) -> list:
    """Batched text-to-image; per-sample generators give the same images as batch-1 runs."""
    neg = editor.model.encode_text([""]).expand(emb.shape[0], -1, -1)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    size = editor.native_size
    out = editor.pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens, height=size, width=size)
    return out.images


def hue_deg(img, mask: np.ndarray) -> float | None:
    """Circular mean hue (degrees) of the saturated pixels under ``mask``."""
    h, s, v = scenes._hsv(np.asarray(img.convert("RGB")))
    sel = mask & (s > 0.45) & (v > 0.25)
    if sel.sum() < 4:
        return None
    a = np.deg2rad(h[sel])
    return float(np.rad2deg(np.arctan2(np.sin(a).mean(), np.cos(a).mean())) % 360)


def measure_t2i(editor: Editor, cs: list[Case], steps: int, guidance: float, batch: int,
                variants: list[tuple[str, str, str, dict]]) -> dict:
    res: dict[str, dict] = {}
    for name, mode, rows, kw in variants:
        both = prot = other = 0
        for b0 in tqdm(range(0, len(cs), batch), desc=f"t2i {name}"):
            chunk = cs[b0 : b0 + batch]
            embs = []
            for c in chunk:
                e = editor.model.encode_text([c.sampled.caption])
                e = protect_embeddings(editor.model, c.sampled.caption, e, protect=[c.protect],
                                       mode=mode, rows=rows, **kw)
                embs.append(e)
            imgs = generate_batch(editor, torch.cat(embs), [c.seed for c in chunk], steps,
                                  guidance)
            for c, img in zip(chunk, imgs, strict=True):
                chk = scenes.check_image(img, c.sampled.scene)
                want = [o.color for o in c.sampled.scene.objects]
                both += chk.color_ok
                other += chk.colors[0] == want[0]
                prot += chk.colors[1] == want[1]
        n = len(cs)
        res[name] = {"both_colors_ok": both / n, "first_ok": other / n,
                     "protected_second_ok": prot / n}
    return res


#: Editing variants: (name, mode, rows, use the source prompt for the undesired rows, kwargs).
EDIT_VARIANTS: list[tuple[str, str, str, bool, dict]] = [
    ("none", "none", "item", True, {}),
    ("project", "project", "item", True, {}),
    ("project+end", "project", "item+end", True, {}),
    ("project-others", "project", "item", False, {}),
    ("replace", "replace", "item", True, {}),
    ("replace+end", "replace", "item+end", True, {}),
    ("both", "both", "item", True, {}),
    ("both+end", "both", "item+end", True, {}),
    ("replace-from-source", "source", "item", True, {}),
]


def replace_from_source(editor: Editor, prompt: str, emb: torch.Tensor, protect: list[str],
                        source_prompt: str) -> torch.Tensor:
    """Not a published control: the protected rows taken from the *source* prompt's encoding."""
    tok = editor.pipe.tokenizer
    src = editor.model.encode_text([source_prompt])[0].to(emb.device, emb.dtype)
    for p in protect:
        for a, b in zip(find_phrase(tok, prompt, p), find_phrase(tok, source_prompt, p),
                        strict=False):
            emb = replace_rows(emb, a, src, b)
    return emb


class Dispatcher:
    """Stands in for ``editor.editing.apply_protection`` inside ``edit_many``: the k-th target
    row gets the k-th variant (edit_many applies it once per target, in order)."""

    def __init__(self, editor: Editor, variants: list[tuple[str, str, str, bool, dict]]):
        self.editor, self.variants, self.k = editor, variants, 0

    def __call__(self, encode, emb, plan, *, mode, **_):
        name, m, rows, use_src, kw = self.variants[self.k % len(self.variants)]
        self.k += 1
        prompt, protect, source_prompt = plan.prompt, plan.phrases, plan.source
        if m == "none":
            return emb
        if m == "source":
            return replace_from_source(self.editor, prompt, emb, list(protect), source_prompt)
        return protect_embeddings(self.editor.model, prompt, emb, protect=protect, mode=m,
                                  rows=rows, source_prompt=source_prompt if use_src else None,
                                  **kw)


def measure_edit(editor: Editor, cs: list[Case], steps: int, guidance: float, method: str,
                 variants: list[tuple[str, str, str, bool, dict]], blends: list[str],
                 on_progress=None) -> dict:
    """Invert every scene (one batch), then per scene one ``edit_many`` per blend setting
    whose target rows are the variants."""
    import editor.editing as E
    from editor.images import psnr

    t0 = time.perf_counter()
    invs = editor.invert_batch([c.sampled.image for c in cs], [c.sampled.caption for c in cs],
                               InvertOptions(method=method, steps=steps, guidance=guidance))
    t_inv = time.perf_counter() - t0
    recs: dict[str, list[dict]] = {f"{b}/{v[0]}": [] for b in blends for v in variants}
    orig = E.apply_protection
    try:
        for c, inv in zip(tqdm(cs, desc="edit"), invs, strict=True):
            sc, src_img = c.sampled.scene, c.sampled.image
            old = sc.objects[0].color
            new = next(k for k in scenes.COLORS if k not in (old, sc.objects[1].color))
            target = sc.with_object(0, color=new).caption()
            m_edit, m_prot = c.sampled.masks[0] > 0.5, c.sampled.masks[1] > 0.5
            h_src = hue_deg(src_img, m_prot)
            for b in blends:
                E.apply_protection = Dispatcher(editor, variants)
                opts = EditOptions(protect=[c.protect], leakage="replace",
                                   blend_words="auto" if b == "blend" else None)
                res = editor.edit_many(inv, [target] * len(variants), opts, progress=False)
                for v, r in zip(variants, res, strict=True):
                    img = r.image
                    recs[f"{b}/{v[0]}"].append({
                        "edit_ok": scenes.classify_color(img, m_edit) == new,
                        "protected_color_ok":
                            scenes.classify_color(img, m_prot) == sc.objects[1].color,
                        "protected_psnr": psnr(img, src_img, mask=m_prot),
                        "protected_hue_shift": hue_shift(h_src, hue_deg(img, m_prot)),
                        "reconstruction_psnr": psnr(r.source, src_img),
                    })
            if on_progress is not None:
                on_progress(summarise(recs, t_inv))
    finally:
        E.apply_protection = orig
    return summarise(recs, t_inv)


def summarise(recs: dict[str, list[dict]], t_inv: float) -> dict:
    out: dict = {"inversion_seconds": round(t_inv, 1)}
    for name, rs in recs.items():
        hs = [r["protected_hue_shift"] for r in rs if r["protected_hue_shift"] is not None]
        ps = [r["protected_psnr"] for r in rs]
        out[name] = {
            "edit_ok": float(np.mean([r["edit_ok"] for r in rs])),
            "protected_color_ok": float(np.mean([r["protected_color_ok"] for r in rs])),
            "protected_psnr_mean": float(np.mean(ps)),
            "protected_psnr_median": float(np.median(ps)),
            "protected_hue_shift_mean": float(np.mean(hs)) if hs else None,
            "protected_hue_shift_max": float(np.max(hs)) if hs else None,
            "source_psnr_mean": float(np.mean([r["reconstruction_psnr"] for r in rs])),
            "cases": len(rs),
        }
    return out


class _MassProcessor:
    """Cross-attention processor that adds up, per key token, the attention probability of
    the conditional half of the batch (diagnostic: which rows does the UNet read?)."""

    def __init__(self, mass: torch.Tensor):
        self.mass = mass

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **_):
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)
        if cross:
            b = hidden_states.shape[0]
            cond = probs.reshape(b, attn.heads, *probs.shape[1:])[b // 2 :]
            self.mass += cond.float().sum(dim=(0, 1, 2)).cpu() / cond.shape[2]
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def attention_mass(editor: Editor, cs: list[Case], steps: int, guidance: float) -> dict:
    """Share of the UNet's cross-attention that falls on BOS, the protected phrase, the other
    words and the EOS/padding rows (conditional branch, all layers, heads and steps)."""
    from editor.embeddings import end_positions, word_positions

    tok = editor.pipe.tokenizer
    unet = editor.pipe.unet
    old = unet.attn_processors
    shares: dict[str, list[float]] = {"bos": [], "protected": [], "other_words": [],
                                      "eos": [], "padding": []}
    try:
        for c in tqdm(cs, desc="attention mass"):
            mass = torch.zeros(editor.model.max_tokens)
            unet.set_attn_processor(_MassProcessor(mass))
            emb = editor.model.encode_text([c.sampled.caption])
            generate_batch(editor, emb, [c.seed], steps, guidance)
            mass /= mass.sum()
            prot = find_phrase(tok, c.sampled.caption, c.protect)[0]
            end = end_positions(tok, c.sampled.caption, editor.model.max_tokens)
            words = [i for i in word_positions(tok, c.sampled.caption) if i not in prot]
            shares["bos"].append(float(mass[0]))
            shares["protected"].append(float(mass[prot].sum()))
            shares["other_words"].append(float(mass[words].sum()))
            shares["eos"].append(float(mass[end[0]]))
            shares["padding"].append(float(mass[end[1:]].sum()))
    finally:
        unet.set_attn_processor(old)
    return {k: float(np.mean(v)) for k, v in shares.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["t2i", "edit", "all", "attention"])
    ap.add_argument("--n-t2i", type=int, default=64, help="text-to-image prompts")
    ap.add_argument("--n-edit", type=int, default=32, help="scenes to invert and edit")
    ap.add_argument("--first-seed", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=64, help="text-to-image batch")
    ap.add_argument("--method", default="null-text", help="inversion method for editing")
    ap.add_argument("--blends", default="blend,noblend",
                    help="edit with P2P's automatic local blend ('blend') and/or without")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default="shapes", help="'shapes' or a diffusers folder")
    ap.add_argument("--out", default=None, help="also write the JSON here (after each part)")
    args = ap.parse_args(argv)
    editor = Editor.from_pretrained(args.model, device=args.device)
    want = set(args.variants.split(",")) if args.variants else None
    result: dict = {"model": args.model, "steps": args.steps, "guidance": args.guidance,
                    "first_seed": args.first_seed,
                    "protected": "second object", "device": str(editor.device)}

    def dump() -> None:
        text = json.dumps(result, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text, flush=True)

    if args.part == "attention":
        result["attention_mass"] = attention_mass(editor, cases(args.n_t2i, args.first_seed),
                                                  args.steps, args.guidance)
        result["attention_mass"]["n"] = args.n_t2i
        dump()
    if args.part in ("t2i", "all"):
        t0 = time.perf_counter()
        vs = [v for v in VARIANTS if want is None or v[0] in want]
        result["t2i"] = measure_t2i(editor, cases(args.n_t2i, args.first_seed), args.steps,
                                    args.guidance, args.batch, vs)
        result["t2i"]["n"] = args.n_t2i
        result["t2i"]["seconds"] = round(time.perf_counter() - t0, 1)
        dump()
    if args.part in ("edit", "all"):
        t0 = time.perf_counter()
        vs = [v for v in EDIT_VARIANTS if want is None or v[0] in want]
        def partial(d: dict) -> None:
            result["edit_partial"] = d
            if args.out:
                with open(args.out, "w") as f:
                    f.write(json.dumps(result, indent=1))

        result["edit"] = measure_edit(editor, cases(args.n_edit, args.first_seed), args.steps,
                                      args.guidance, args.method, vs, args.blends.split(","),
                                      on_progress=partial)
        result.pop("edit_partial", None)
        result["edit"]["n"] = args.n_edit
        result["edit"]["method"] = args.method
        result["edit"]["seconds"] = round(time.perf_counter() - t0, 1)
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
