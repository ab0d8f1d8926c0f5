"""Editing an inversion by rewriting its prompt: the two-branch Prompt-to-Prompt edit.

Hertz et al. 2022 ("Prompt-to-Prompt Image Editing with Cross Attention Control") on top
of an :class:`~editor.inversion.Inversion` (Mokady et al. 2022, sec. 4): one batch holds
the source branch (row 0, which re-creates the inverted image) and ``K`` target branches
(rows ``1..K``). At step ``i`` every row uses the inversion's null embedding; the
attention controller (:mod:`editor.attention`) injects the source's attention into the
targets, and local blending (:mod:`editor.blending`) keeps the latent outside the edited
region. The defaults and why they are what they are: ``docs/methods.md``.

:func:`edit_many` runs in three steps, each a function of its own:

1. :func:`prepare` - the plan (:func:`editor.plan.plan_edit`: every prompt resolved
   once), the text encodings (with leakage control and text reweighting), the
   controller and the blend;
2. :func:`editor.sampling.denoise` - the one sampling loop;
3. :func:`collect` - decoding, pixel compositing, attention maps, :class:`EditResult`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .attention import PromptToPrompt, StoreKey, describe_layers
from .blending import LocalBlend, blend_keys, composite, make_blend
from .compose import border_px, covers_everything, full_resolution, load_mask
from .embeddings import apply_protection, reweight_rows
from .fastedit import fast_denoise
from .images import image_hash, load_image
from .model import Cond
from .options import EditOptions
from .plan import EditPlan, plan_edit
from .progress import Callback, EditCancelled
from .prompts import PromptTokens
from .sampling import check_timesteps, denoise

if TYPE_CHECKING:  # pragma: no cover
    from .fastpath import FastPath
    from .inversion import Inversion
    from .model import Model

__all__ = ["EditResult", "EditCancelled", "PreparedEdit", "prepare", "collect", "edit",
           "edit_many"]


@dataclass
class EditResult:
    """One edited image and what produced it.

    ``attention_maps`` / ``source_attention_maps``: word -> ``h x w`` float32 array in
    [0, 1] (cross-attention averaged over heads, the stored layers and all steps, the
    word's tokens summed, normalised by its max); ``mask``: the last local-blend mask
    (latent size, bool) or ``None`` without blending; ``seconds``: the whole batched run.
    """

    image: Image.Image
    source: Image.Image
    target: str
    attention_maps: dict[str, np.ndarray] = field(default_factory=dict)
    source_attention_maps: dict[str, np.ndarray] = field(default_factory=dict)
    mask: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: the edit at the working (model) size; ``image`` is the original's size when the edit
    #: was given ``original=``, else the same picture
    image_native: Image.Image | None = None
    #: the final pixel mask at the working size (``h x w`` float32 in [0, 1]): where the
    #: edit may differ from the reconstruction; ``None`` without blending
    mask_image: np.ndarray | None = None


@dataclass
class PreparedEdit:
    """Everything the sampling loop needs for one batched edit (step 1's output)."""

    plan: EditPlan
    emb: Cond  # rows (x L x D), fp32: source row, then the targets
    controller: PromptToPrompt
    blend: LocalBlend | None
    blend_keys: list[StoreKey]
    display_keys: list[StoreKey]
    guidance: float
    original: Image.Image | None = None  # the full-size input, checked against the inversion
    user_mask: np.ndarray | None = None  # working size, in [0, 1]


# -- 1. prepare ------------------------------------------------------------------------------------


def encode_rows(model: Model, plan: EditPlan) -> Cond:
    """Text encodings of the source and each target; the targets' protected by the plan's
    leakage control and reweighted in the text encoding.

    SDXL: the leakage controls act on the token rows of both encoders (projection per
    encoder's block of columns, :func:`editor.embeddings.apply_protection`); the pooled
    row is left as encoded. Text reweighting interpolates the pooled row as it does the
    token rows (towards the prompt without the word)."""
    cond = model.encode(plan.prompts).float()
    emb = cond.tokens
    blocks = model.text_widths if model.is_sdxl else None
    leakage = plan.options.leakage
    for k, pp in enumerate(plan.protect, start=1):
        if pp is not None:
            emb[k : k + 1] = apply_protection(model.encode_text, emb[k : k + 1], pp,
                                              mode=leakage, blocks=blocks).float()
    for k, steps in enumerate(plan.reweight_text, start=1):
        if steps:
            emb[k] = reweight_rows(model.encode_text, emb[k], steps)
            if cond.pooled is not None:
                cond.pooled[k] = reweight_pooled(model, cond.pooled[k], steps)
    return cond


def reweight_pooled(model: Model, pooled: torch.Tensor, steps) -> torch.Tensor:
    """SDXL's pooled row under text reweighting: ``p_wo + s (p - p_wo)`` per word, ``s``
    clipped to [0, 1] as :func:`editor.embeddings.reweight_rows` does for the token rows."""
    out = pooled.float().clone()
    for st in steps:
        p_wo = model.encode([st.rest]).pooled[0].float().to(out.device)
        s = min(max(float(st.scale), 0.0), 1.0)
        out = p_wo + s * (out - p_wo)
    return out


def load_original(inv: Inversion, original) -> Image.Image:
    """``original`` (a path or an image) read as the inversion read its input, and refused
    unless its pixels are those the inversion was made from."""
    img = load_image(original)
    if image_hash(img) != inv.image_hash:
        raise ValueError(
            "original= is not the image this inversion was made from (its pixels differ from "
            f"those inverted: {img.size[0]} x {img.size[1]}); pass the same file, or invert "
            "this image")
    return img


def user_mask_tensors(mask: np.ndarray, latent_hw: tuple[int, int], factor: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A working-size mask as (latent ``1 x 1 x h x w`` bool: a latent cell counts when any
    of its pixels is in the mask, image ``H x W`` 0/1)."""
    pix = torch.from_numpy(mask > 0.5)
    h, w = latent_hw
    lat = pix.reshape(h, factor, w, factor).any(dim=3).any(dim=1)
    return lat[None, None], pix.float()


def prepare(model: Model, inv: Inversion, targets: Sequence[str], options: EditOptions, *,
            mask=None, original=None) -> PreparedEdit:
    """Step 1: check the inputs, plan the prompts, encode, build controller and blend."""
    check_timesteps(model, inv)
    orig = None if original is None else load_original(inv, original)
    user = None if mask is None else load_mask(mask, tuple(inv.image_size))
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("give at least one target prompt")
    source = model.check_prompt(inv.prompt, what="source prompt")
    targets = [model.check_prompt(t, what="target prompt") for t in targets]
    o = options
    w = float(inv.guidance if o.guidance is None else o.guidance)
    steps = inv.steps
    plan = plan_edit(model.tokenizer, source, targets, o, model.max_tokens)
    emb = encode_rows(model, plan)
    latent_hw = (int(inv.z_T.shape[-2]), int(inv.z_T.shape[-1]))
    layers = list(describe_layers(model.unet, latent_hw).values())
    keys = blend_keys(layers, latent_hw, o.blend_maps)
    shown = blend_keys(layers, latent_hw, "half")  # the maps the result shows per word
    controller = PromptToPrompt(
        rows=plan.rows, mapper=plan.mapper(), token_alpha=plan.token_alpha(),
        cross_alpha=plan.cross_alpha(steps), self_window=plan.self_window(steps),
        self_max_queries=int(latent_hw[0] * latent_hw[1] * o.self_fraction),
        equalizer=plan.equalizer, store_keys=set(keys) | set(shown),
    )
    user_t = None
    if user is not None:
        user_t = user_mask_tensors(user, latent_hw, model.vae_scale_factor)
    return PreparedEdit(plan, emb, controller, make_blend(plan, keys, steps, user_t), keys,
                        shown, w, orig, user)


# -- 3. collect --------------------------------------------------------------------------------------


def _word_maps(maps: torch.Tensor | None, pt: PromptTokens) -> dict[str, np.ndarray]:
    """``L x h x w`` token maps -> word -> normalised ``h x w`` array."""
    out: dict[str, np.ndarray] = {}
    if maps is None:
        return out
    for word in dict.fromkeys(pt.words):
        m = maps[pt.positions(word)].sum(0)
        mx = float(m.max())
        out[word] = (m / mx if mx > 0 else m).cpu().numpy().astype(np.float32)
    return out


def collect(model: Model, inv: Inversion, prep: PreparedEdit, latents: torch.Tensor,
            seconds: float) -> list[EditResult]:
    """Step 3: decode, composite with the blend's pixel mask, attention maps, results."""
    plan, blend, o = prep.plan, prep.blend, prep.plan.options
    images = model.decode_latents(latents)
    hw = (images[0].size[1], images[0].size[0])
    pix = None if blend is None else blend.pixel_mask(hw)
    if pix is not None and o.pixel_blend:
        images = [images[0]] + [composite(images[0], im, pix[k])
                                for k, im in enumerate(images[1:], start=1)]
    maps = prep.controller.store.average(prep.display_keys)
    src_maps = _word_maps(None if maps is None else maps[0], plan.source)
    common = {
        **o.to_dict(), "blend_mask": plan.mask_source or "none",
        "user_mask": prep.user_mask is not None,
        "blend_sizes": [list(k[:2]) for k in prep.blend_keys], "guidance": prep.guidance,
        "leakage": o.leakage if o.protect else "none",
        "method": inv.method, "steps": inv.steps, "batch": plan.rows,
    }
    results = []
    for k, tp in enumerate(plan.targets, start=1):
        mask = None
        if blend is not None and blend.last_mask is not None:
            mask = blend.last_mask[k, 0].cpu().numpy()
        words = plan.blend_rows[k] if plan.blend_auto else list(o.blend_words or ())
        src_words = plan.blend_rows[0] if plan.blend_auto else list(o.blend_words or ())
        mask_image = None if pix is None else pix[k].cpu().numpy().astype(np.float32)
        extra: dict[str, Any] = {}
        if mask_image is not None and covers_everything(mask_image):
            extra["notice"] = "the mask covers the whole image: no pixel of the source is kept"
        image = images[k]
        if prep.original is not None:
            image, _ = full_resolution(prep.original, images[k], mask_image)
            kept = mask_image is not None
            extra["full_resolution"] = {
                "size": list(image.size), "kept_original_pixels": kept,
                "border_px": border_px(image.size, images[k].size) if kept else 0}
            if not kept:
                extra["notice"] = ("no blend mask (blending off): the whole edit was upscaled; "
                                   "no pixel of the original is kept")
        results.append(EditResult(
            image=image, source=images[0], target=tp.target,
            attention_maps=_word_maps(None if maps is None else maps[k], tp.tokens),
            source_attention_maps=src_maps, mask=mask, seconds=seconds,
            options={**common, "mode": tp.mode, "blend_words": words,
                     "blend_source_words": src_words,
                     "changed": [tp.changed_source, tp.changed_target], **extra},
            image_native=images[k], mask_image=mask_image,
        ))
    return results


# -- the verb ----------------------------------------------------------------------------------------


def edit_many(model: Model, inv: Inversion, targets: Sequence[str],
              options: EditOptions | None = None, *, mask=None, original=None,
              callback: Callback | None = None, progress: bool = True,
              fast: FastPath | None = None) -> list[EditResult]:
    """Prompt-to-Prompt edits of one inversion into several targets, in one batch
    (options: :class:`editor.options.EditOptions`).

    ``mask``: a user mask (image, array or path; any size) that confines the edit
    (:func:`editor.compose.load_mask`; ``options.mask_mode`` combines it with the automatic
    one): outside it every pixel is the reconstruction's. ``original``: the full-size image
    the inversion was made from (checked); each result's ``image`` is then the original's
    size, the original's pixels outside the feathered mask (:mod:`editor.compose`).
    ``callback(step, total)`` after every step; returning ``False`` cancels
    (:class:`editor.progress.Cancelled`). ``fast``: a :class:`editor.fastpath.FastPath`
    runs the sampling loop in static buffers / CUDA graphs (:mod:`editor.fastedit`)."""
    t0 = time.perf_counter()
    prep = prepare(model, inv, targets, options or EditOptions(), mask=mask, original=original)
    run = denoise if fast is None else partial(fast_denoise, fast=fast)
    latents = run(model, inv, prep.emb, guidance=prep.guidance, controller=prep.controller,
                  blend=prep.blend, callback=callback, progress=progress, desc="editing")
    return collect(model, inv, prep, latents, time.perf_counter() - t0)


def edit(model: Model, inv: Inversion, target: str, options: EditOptions | None = None, *,
         mask=None, original=None, callback: Callback | None = None,
         progress: bool = True) -> EditResult:
    """Edit ``inv`` into ``target`` (see :func:`edit_many`)."""
    return edit_many(model, inv, [target], options, mask=mask, original=original,
                     callback=callback, progress=progress)[0]
