"""Editing an inversion by rewriting its prompt: the two-branch Prompt-to-Prompt loop.

Hertz et al. 2022 ("Prompt-to-Prompt Image Editing with Cross Attention Control")
on top of an :class:`~editor.inversion.Inversion` (Mokady et al. 2022, sec. 4):
one batch holds the source branch (row 0, which re-creates the inverted image)
and ``K`` target branches (rows ``1..K``). At step ``i`` every row uses the
inversion's null embedding ``inv.uncond_at(i)``; the attention controller
(:mod:`editor.attention`) injects the source's attention into the targets, and
local blending keeps the latent outside the edited words' region.

Defaults (what a user gets without the advanced panel): word swap / refinement
chosen from the word counts, cross-attention injection for 80% of the steps,
self-attention for 40% (maps of at most 1/4 of the latent's positions), and
*automatic local blending* on the region the prompt change affects. Because the
bundled model's per-word cross-attention maps do not localise (its conditional
branch reads ~80% of its attention from the end/padding rows), that region is not
taken from word maps but from DiffEdit's noise difference (Couairon et al. 2022):
``|eps(x_src, target) - eps(x_src, source)|`` over the first 20% of the steps,
thresholded at 0.5 of its max. The latents are blended from 20% of the steps
(P2P), and the decoded images are composited with the same mask, because the
bundled VAE decoder (mid-block attention, group norm) lets the edited region's
latents re-colour the whole background. Explicit ``blend_words`` give the published
word-map blend. Measured in the README ("Prompt edits").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import prompts as P
from .attention import (
    SELF_REPLACE_MAX_FRACTION,
    LocalBlend,
    PromptToPrompt,
    attention_control,
    describe_layers,
)

if TYPE_CHECKING:  # pragma: no cover
    from .inversion import Inversion
    from .model import Editor

#: Default leakage control applied to the target rows when ``protect`` is given.
DEFAULT_LEAKAGE = "replace"
BLEND_THRESHOLD = 0.3
BLEND_START = 0.2
#: Local blending reads cross-attention maps whose side is at least this fraction of the
#: latent's side (bundled model, 16x16 latent: the 16x16 and 8x8 maps).
BLEND_MIN_FRACTION = 0.5
#: Noise-difference masks: estimated over this fraction of the first steps, threshold.
NOISE_MASK_STEPS = 0.2
NOISE_MASK_THRESHOLD = 0.5
BLEND_MASKS = ("auto", "attention", "noise")

Window = float | tuple[float, float]


class EditCancelled(RuntimeError):
    """Raised when a progress callback asks the edit to stop."""


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


# -- option parsing (pure) -------------------------------------------------------------------------


def step_window(value: Window, steps: int, what: str) -> tuple[int, int]:
    """A fraction ``f`` (= ``(0, f)``) or a ``(start, end)`` pair of fractions -> step range."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = 0.0, float(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
    else:
        raise ValueError(f"{what} must be a fraction in [0, 1] or a (start, end) pair, got {value!r}")
    if not (0.0 <= lo <= hi <= 1.0) or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{what} must lie in [0, 1] with start <= end, got {value!r}")
    return int(round(lo * steps)), int(round(hi * steps))


def cross_alpha(
    tok, targets: Sequence[str], cross_replace: Window | Mapping[str, Window], steps: int, max_len: int
) -> tuple[torch.Tensor, int]:
    """``steps x K x L`` injection weights (P2P ``get_time_words_attention_alpha``).

    ``cross_replace`` is a fraction, a ``(start, end)`` pair, or a dict with per-word
    windows and an optional ``"default_"`` entry. Returns the weights and the end step
    of the default window (reweighting acts until then).
    """
    per_word: dict[str, Window] = {}
    if isinstance(cross_replace, Mapping):
        per_word = {k: v for k, v in cross_replace.items() if k != "default_"}
        default = cross_replace.get("default_", 1.0)
    else:
        default = cross_replace
    lo, hi = step_window(default, steps, "cross_replace")
    alpha = torch.zeros(steps, len(targets), max_len)
    alpha[lo:hi] = 1.0
    for word, win in per_word.items():
        w_lo, w_hi = step_window(win, steps, f"cross_replace[{word!r}]")
        hits = 0
        for k, tgt in enumerate(targets):
            try:
                idx = P.word_indices(tok, tgt, word)
            except ValueError:
                continue
            hits += 1
            alpha[:, k, idx] = 0.0
            alpha[w_lo:w_hi, k, idx] = 1.0
        if not hits:
            raise ValueError(f"cross_replace word {word!r} is not in the target prompt {targets[0]!r}")
    return alpha, hi


def equalizer(tok, targets: Sequence[str], reweight: Mapping[str, float], max_len: int) -> torch.Tensor:
    """``K x L`` column scales for reweighting (P2P ``get_equalizer``)."""
    eq = torch.ones(len(targets), max_len)
    for word, scale in reweight.items():
        try:
            s = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"reweight factor for {word!r} must be a number, got {scale!r}") from None
        if not math.isfinite(s):
            raise ValueError(f"reweight factor for {word!r} must be finite, got {scale!r}")
        hits = 0
        for k, tgt in enumerate(targets):
            try:
                eq[k, P.word_indices(tok, tgt, word)] = s
                hits += 1
            except ValueError:
                continue
        if not hits:
            P.word_indices(tok, targets[0], word)  # raises: the word is not in the prompt
    return eq


def blend_weights(
    tok, source: str, targets: Sequence[str], per_row: Sequence[Sequence[str]], max_len: int,
    what: str,
) -> torch.Tensor:
    """``rows x L`` token weights: 1 on the tokens of each row's words (missing words skipped)."""
    rows = [source, *targets]
    w = torch.zeros(len(rows), max_len)
    for r, (prompt, wordlist) in enumerate(zip(rows, per_row, strict=True)):
        for word in wordlist:
            try:
                w[r, P.word_indices(tok, prompt, word)] = 1.0
            except ValueError:
                continue
    return w


def words_or_auto(blend_words: Sequence[str] | str | None) -> bool:
    """Whether ``blend_words`` turns local blending on."""
    if blend_words is None or blend_words is False:
        return False
    return blend_words == "auto" or bool(_word_list(blend_words, "blend_words"))


def _word_list(words: Sequence[str] | str | None, what: str) -> list[str]:
    if words is None:
        return []
    if isinstance(words, str):
        words = [words]
    out = [" ".join(str(w).split()) for w in words]
    if any(not w for w in out):
        raise ValueError(f"{what} contains an empty word")
    return out


def _check_present(tok, prompts: Sequence[str], words: Sequence[str], what: str) -> None:
    for word in words:
        if not any(_has(tok, p, word) for p in prompts):
            raise ValueError(
                f"{what} word {word!r} is not in the prompt {prompts[0]!r}"
                + (f" or the target {prompts[1]!r}" if len(prompts) == 2 else " or any target")
            )


def _has(tok, prompt: str, word: str) -> bool:
    try:
        P.word_indices(tok, prompt, word)
        return True
    except ValueError:
        return False


def blend_sizes(layers, latent_hw: tuple[int, int], min_fraction: float = BLEND_MIN_FRACTION
                ) -> list[tuple[int, int]]:
    """Cross-attention map sizes used for blending: side >= ``min_fraction`` of the latent's
    (at least the largest cross-attention size)."""
    sizes = sorted({la.size for la in layers if la.cross}, key=lambda s: -s[0] * s[1])
    if not sizes:
        raise ValueError("the UNet has no cross-attention layers; Prompt-to-Prompt cannot edit it")
    keep = [s for s in sizes if min(s[0] / latent_hw[0], s[1] / latent_hw[1]) >= min_fraction]
    return keep or sizes[:1]


def without_word(prompt: str, word: str) -> str:
    """``prompt`` with every occurrence of ``word`` (a word or phrase, any case) removed."""
    spans = P.split_words(prompt)
    query = P.words(word)
    n = len(query)
    cut: list[tuple[int, int]] = []
    for k in range(len(spans) - n + 1):
        if [w_ for w_, _, _ in spans[k : k + n]] == query:
            cut.append((spans[k][1], spans[k + n - 1][2]))
    out, pos = [], 0
    for a, b in cut:
        out.append(prompt[pos:a])
        pos = b
    out.append(prompt[pos:])
    return " ".join("".join(out).split())


@torch.no_grad()
def reweight_embedding(editor: Editor, prompt: str, emb: torch.Tensor,
                       reweight: Mapping[str, float]) -> torch.Tensor:
    """Scale words' contribution to the whole text encoding (``L x D``), rows aligned by tokens.

    ``X_s = X_without + s (X - X_without)`` with ``s`` clipped to ``[0, 1]``,
    ``X_without`` = the prompt encoded without the word, its rows aligned to ``prompt``'s
    by :func:`editor.prompts.refine_mapper` (the word's own rows keep ``X``, their
    attention is scaled by the P2P equalizer with the unclipped factor). A causal text
    encoder writes every word into all later rows, end and padding rows included; on the
    bundled model those carry most of the attention, so attention column scaling alone
    hardly changes the image (README, "Prompt edits"). The encoding is interpolated,
    never extrapolated: ``s > 1`` leaves the encoder's output range, and on the bundled
    model it turned triangles into circles and squares and added blobs (README).
    """
    tok = editor.pipe.tokenizer
    out = emb.float().clone()
    for word, scale in reweight.items():
        rest = without_word(prompt, word)
        x_wo = editor.encode_text([rest])[0].float().to(out.device)
        index, alpha = P.refine_mapper(tok, rest, prompt, out.shape[0])
        base = x_wo[index.to(out.device)]
        keep = (alpha > 0).to(out.device)[:, None]
        s = min(max(float(scale), 0.0), 1.0)
        out = torch.where(keep, base + s * (out - base), out)
    return out.to(emb.dtype)


def composite(source: Image.Image, edited: Image.Image, mask: torch.Tensor) -> Image.Image:
    """``source * (1 - M) + edited * M`` (``M`` resized bilinearly to the image if needed).

    Latent blending alone does not keep the background when the VAE decoder mixes
    information across the whole image (attention / group norm in its mid block, as in
    the bundled model): the edited region's latents then re-colour the background.
    """
    w, h = source.size
    m = mask.float()
    if tuple(m.shape) != (h, w):
        m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = m.clamp(0, 1).cpu().numpy()[..., None]
    a = np.asarray(source, dtype=np.float32)
    b = np.asarray(edited, dtype=np.float32)
    return Image.fromarray(np.clip(np.round(a * (1 - m) + b * m), 0, 255).astype(np.uint8))


def _word_maps(maps: torch.Tensor | None, tok, prompt: str) -> dict[str, np.ndarray]:
    """``L x h x w`` token maps -> word -> normalised ``h x w`` array."""
    out: dict[str, np.ndarray] = {}
    if maps is None:
        return out
    for word in dict.fromkeys(P.words(prompt)):
        m = maps[P.word_indices(tok, prompt, word)].sum(0)
        mx = float(m.max())
        out[word] = (m / mx if mx > 0 else m).cpu().numpy().astype(np.float32)
    return out


# -- the loop ----------------------------------------------------------------------------------------


def edit(editor: Editor, inv: Inversion, target: str, **kwargs: Any) -> EditResult:
    """Edit ``inv`` into ``target``; see :func:`edit_many` for the options."""
    return edit_many(editor, inv, [target], **kwargs)[0]


@torch.no_grad()
def edit_many(
    editor: Editor,
    inv: Inversion,
    targets: Sequence[str],
    *,
    cross_replace: Window | Mapping[str, Window] = 0.8,
    self_replace: Window = 0.4,
    blend_words: Sequence[str] | str | None = "auto",
    blend_subtract: Sequence[str] | None = None,
    blend_threshold: float = BLEND_THRESHOLD,
    blend_start: float = BLEND_START,
    blend_mask: str = "auto",
    noise_threshold: float = NOISE_MASK_THRESHOLD,
    pixel_blend: bool = True,
    reweight: Mapping[str, float] | None = None,
    mode: str = "auto",
    reweight_text: bool = True,
    protect: Sequence[str] | str | None = None,
    leakage: str = DEFAULT_LEAKAGE,
    guidance: float | None = None,
    self_max_fraction: float = SELF_REPLACE_MAX_FRACTION,
    callback: Callable[[int, int], bool | None] | None = None,
    progress: bool = True,
) -> list[EditResult]:
    """Prompt-to-Prompt edits of one inversion into several targets, in one batch.

    - ``mode``: ``"replace"`` (word swap, same word count), ``"refine"`` (words added or
      removed; token alignment), ``"auto"`` (by word count), chosen per target.
    - ``cross_replace``: fraction of steps (or ``(start, end)``, or per-word dict with
      ``"default_"``) during which targets take the source's cross-attention.
    - ``self_replace``: fraction of steps with the source's self-attention, on maps of at
      most ``self_max_fraction`` of the latent's positions.
    - ``blend_words``: ``"auto"`` (default: blend where the prompt change acts, see
      ``blend_mask``), a list of words (looked up in the source and in each target), or
      ``None`` / ``[]`` for no local blending. ``blend_subtract``: words whose region
      is excluded from the mask.
    - ``blend_mask``: ``"auto"`` (``"noise"`` for ``blend_words="auto"``, else
      ``"attention"``), ``"attention"`` (P2P: the words' cross-attention maps, threshold
      ``blend_threshold``; with ``"auto"`` words: the changed words), ``"noise"``
      (DiffEdit-style prediction difference, thresholded at ``noise_threshold`` of its
      max: lower covers more of the object's rim and more background). ``pixel_blend``:
      also composite the decoded images with the mask (default on).
    - ``reweight``: ``{word: scale}`` on the target's attention columns (composes with
      replace/refine) while cross-attention is injected; with ``reweight_text`` (default)
      also on the word's share of the whole text encoding, for scales below 1
      (:func:`reweight_embedding`).
    - ``protect`` + ``leakage``: leakage control of :func:`editor.embeddings.protect_embeddings`
      applied to the target rows' text encoding (``leakage="none"`` turns it off).
    - ``guidance``: defaults to the inversion's.
    - ``callback(step, total)``: after every step; returning ``False`` cancels.
    """
    t0 = time.perf_counter()
    inv.check_model(editor)
    tok = editor.pipe.tokenizer
    L = editor.max_tokens
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("give at least one target prompt")
    source = editor.check_prompt(inv.prompt, what="source prompt")
    targets = [editor.check_prompt(t, what="target prompt") for t in targets]
    K, steps = len(targets), inv.steps
    w = float(inv.guidance if guidance is None else guidance)
    if not w >= 1.0:
        raise ValueError(f"guidance must be >= 1, got {guidance}")
    if blend_mask not in BLEND_MASKS:
        raise ValueError(f"unknown blend_mask {blend_mask!r}; use one of {', '.join(BLEND_MASKS)}")
    if not 0.0 <= float(blend_start) <= 1.0:
        raise ValueError(f"blend_start must be in [0, 1], got {blend_start}")
    if not 0.0 <= float(blend_threshold) < 1.0:
        raise ValueError(f"blend_threshold must be in [0, 1), got {blend_threshold}")
    if not 0.0 <= float(noise_threshold) < 1.0:
        raise ValueError(f"noise_threshold must be in [0, 1), got {noise_threshold}")
    if not 0.0 <= float(self_max_fraction) <= 1.0:
        raise ValueError(f"self_max_fraction must be in [0, 1], got {self_max_fraction}")
    sched = editor.scheduler()
    sched.set_timesteps(steps)
    if [int(t) for t in sched.timesteps] != list(inv.timesteps):
        raise ValueError("the model's scheduler walks other timesteps than this inversion; "
                         "invert the image again with this model")

    # 1. prompt alignment: per-target mapper, token alphas, changed words
    plans = [P.plan_edit(tok, source, t, mode, L) for t in targets]
    mapper = torch.stack([p.mapper for p in plans])
    token_alpha = torch.stack([p.alpha for p in plans])
    c_alpha, reweight_until = cross_alpha(tok, targets, cross_replace, steps, L)
    s_window = step_window(self_replace, steps, "self_replace")
    eq = None
    reweight = dict(reweight or {})
    if reweight:
        eq = equalizer(tok, targets, reweight, L)

    # 2. local blending: which words, per row
    subtract = _word_list(blend_subtract, "blend_subtract")
    if isinstance(blend_words, str) and blend_words == "auto":
        src_words = sorted({w_ for p in plans for w_ in p.changed_source})
        per_row = [src_words] + [p.changed_target for p in plans]
        if not any(per_row) and reweight:
            per_row = [list(reweight)] * (K + 1)
        resolved: Any = "auto"
        mask_source = "noise" if blend_mask == "auto" else blend_mask
    else:
        words = _word_list(blend_words, "blend_words")
        _check_present(tok, [source, *targets], words, "blend_words")
        per_row = [words] * (K + 1)
        resolved = words
        mask_source = "attention" if blend_mask == "auto" else blend_mask
    if not words_or_auto(blend_words):
        mask_source = None
    _check_present(tok, [source, *targets], subtract, "blend_subtract")

    # 3. text embeddings (targets optionally protected against leakage)
    emb = editor.encode_text([source, *targets]).float()
    protect_list = _word_list(protect, "protect")
    if protect_list and leakage != "none":
        from .embeddings import protect_embeddings

        _check_present(tok, targets, protect_list, "protect")
        for k, tgt in enumerate(targets, start=1):
            here = [p for p in protect_list if _has(tok, tgt, p)]
            if here:
                emb[k : k + 1] = protect_embeddings(
                    editor, tgt, emb[k : k + 1], protect=here, mode=leakage, source_prompt=source
                ).float()

    if reweight and reweight_text:
        for k, tgt in enumerate(targets, start=1):
            here = {w_: v for w_, v in reweight.items() if _has(tok, tgt, w_)}
            if here:
                emb[k] = reweight_embedding(editor, tgt, emb[k], here)

    # 4. controller and blend
    z = inv.z_T.to(editor.device).float()
    latent_hw = (int(z.shape[-2]), int(z.shape[-1]))
    layers = list(describe_layers(editor.pipe.unet, latent_hw).values())
    sizes = blend_sizes(layers, latent_hw)
    controller = PromptToPrompt(
        rows=K + 1, mapper=mapper, token_alpha=token_alpha, cross_alpha=c_alpha,
        self_window=s_window,
        self_max_queries=int(latent_hw[0] * latent_hw[1] * float(self_max_fraction)),
        equalizer=eq, reweight_until=reweight_until, store_sizes=set(sizes),
    )
    blend = None
    add = blend_weights(tok, source, targets, per_row, L, "blend_words")
    sub = blend_weights(tok, source, targets, [subtract] * (K + 1), L, "blend_subtract")
    start = int(round(blend_start * steps))
    if mask_source == "noise":
        blend = LocalBlend(None, sizes, start=start, subtract=sub if subtract else None,
                           source="noise", noise_until=max(1, int(round(NOISE_MASK_STEPS * steps))),
                           noise_threshold=float(noise_threshold))
    elif mask_source == "attention" and add.any():
        blend = LocalBlend(add, sizes, start=start, threshold=blend_threshold,
                           subtract=sub if subtract else None)

    # 5. sampling: source row 0, targets 1..K, unconditional half first
    unet = editor.pipe.unet
    latents = z.expand(K + 1, -1, -1, -1).clone()
    offsets = inv.offsets.to(editor.device).float() if inv.offsets is not None else None
    with attention_control(unet, controller, latent_hw):
        for i, t in enumerate(tqdm(inv.timesteps, desc="editing", disable=not progress, leave=False)):
            controller.set_step(i)
            null = inv.uncond_at(i).to(editor.device).float().expand(K + 1, -1, -1)
            ctx = torch.cat([null, emb]).to(unet.dtype)
            x_in = torch.cat([latents, latents]).to(unet.dtype)
            e_u, e_c = unet(x_in, t, encoder_hidden_states=ctx).sample.float().chunk(2)
            if blend is not None and blend.wants_noise(i):
                # DiffEdit-style: the target prompts on the source branch's latent
                controller.active = False
                try:
                    e_tgt = unet(latents[:1].expand(K, -1, -1, -1).to(unet.dtype), t,
                                 encoder_hidden_states=emb[1:].to(unet.dtype)).sample.float()
                finally:
                    controller.active = True
                blend.observe(e_c[:1], e_tgt, i)
            latents = sched.step(e_u + w * (e_c - e_u), t, latents).prev_sample
            if offsets is not None:
                latents[:1] = latents[:1] + offsets[i].reshape_as(latents[:1])
            if blend is not None:
                latents = blend(latents, controller.store, i)
            if callback is not None and callback(i + 1, steps) is False:
                raise EditCancelled(f"edit cancelled after {i + 1} of {steps} steps")

    # 6. decode, maps, results
    images = editor.decode_latents(latents)
    pix = None
    if blend is not None and pixel_blend:
        pix = blend.pixel_mask((images[0].size[1], images[0].size[0]))
    if pix is not None:
        images = [images[0]] + [composite(images[0], im, pix[k])
                                for k, im in enumerate(images[1:], start=1)]
    maps = controller.store.average(sizes)
    seconds = time.perf_counter() - t0
    src_maps = _word_maps(None if maps is None else maps[0], tok, source)
    options = {
        "cross_replace": cross_replace, "self_replace": self_replace,
        "self_max_fraction": self_max_fraction, "blend_threshold": blend_threshold,
        "blend_start": blend_start, "blend_mask": mask_source or "none",
        "noise_threshold": float(noise_threshold), "pixel_blend": pixel_blend,
        "blend_sizes": [list(s) for s in sizes],
        "reweight": reweight, "protect": protect_list,
        "leakage": leakage if protect_list else "none", "guidance": w,
        "method": inv.method, "steps": steps, "batch": K + 1,
    }
    results = []
    for k, plan in enumerate(plans, start=1):
        mask = None
        if blend is not None and blend.last_mask is not None:
            mask = blend.last_mask[k, 0].cpu().numpy()
        results.append(EditResult(
            image=images[k], source=images[0], target=plan.target,
            attention_maps=_word_maps(None if maps is None else maps[k], tok, plan.target),
            source_attention_maps=src_maps, mask=mask, seconds=seconds,
            options={**options, "mode": plan.mode,
                     "blend_words": (per_row[k] if resolved == "auto" else resolved),
                     "blend_source_words": per_row[0] if resolved == "auto" else resolved,
                     "blend_subtract": subtract, "changed": [plan.changed_source, plan.changed_target]},
        ))
    return results
