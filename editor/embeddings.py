"""Leakage controls on text-encoder output: embedding projection and token replacement.

Both act after the text encoder and before the UNet, on ``X`` (``... x L x D``,
tokens as rows), so they work for any batch size, token count and width.

- Projection (DECOR, Jang et al. 2024, arXiv 2412.09169, eq. for ``X'``):
  ``P = V~ V~^T`` from the right singular vectors of the undesired rows ``X~``
  and ``X' = X - a X P`` on the chosen rows.
- Token-representation replacement (Follow the Flow, arXiv 2504.01137):
  the rows of a protected item are replaced by the item encoded alone, aligned
  to the same token positions.

:func:`protect_embeddings` ties them to prompts. Choices (measured on the
bundled model with ``tools/measure_leakage.py``; tables in ``docs/measurements.md``,
"Leakage controls" section):

- Undesired directions for projection: the rows of the *edited* words (target
  tokens that differ from ``source_prompt``) when a source prompt is given,
  else the rows of every other word of the prompt (not BOS, EOS, padding or
  punctuation); each row minus the mean of the prompt's word rows, because all
  CLIP rows share one dominant direction (cosine ~0.9) that is kept.
- Rows touched: ``rows="item"`` (default) touches only the protected phrase's
  tokens. ``rows="item+end"`` also touches the EOS and padding rows, which in a
  causal encoder summarise the whole prompt; on the bundled model they take
  ~80% of the UNet's cross-attention, so touching them removed the edit
  (edit success 71% -> 21-42%) and, in text-to-image, painted the whole image
  with the protected item: measured worse, hence not the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from . import prompts as P
from .options import LEAKAGE_MODES
from .plan import ProtectPlan, ReweightStep, plan_protection

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

MODES = LEAKAGE_MODES
ROWS = ("item", "item+end")
Encode = Callable[[list[str]], torch.Tensor]


# -- pure tensor functions -----------------------------------------------------------------------


def projection_matrix(undesired_rows: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor:
    """``P = V~ V~^T`` (DECOR): projector onto the row space of ``undesired_rows`` (``... x k x d``).

    Rank-tolerant: only right singular vectors whose singular value exceeds
    ``rtol * max`` are kept, so duplicated or zero rows are fine; no rows (or
    all-zero rows) give the zero matrix. Returns ``... x d x d`` in float32.
    """
    if undesired_rows.dim() < 2:
        raise ValueError(f"undesired_rows must be k x d (got shape {tuple(undesired_rows.shape)})")
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1), got {rtol}")
    x = undesired_rows.float()
    d = x.shape[-1]
    if x.shape[-2] == 0:
        return x.new_zeros(*x.shape[:-2], d, d)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s: ... x r, vh: ... x r x d
    smax = s.amax(dim=-1, keepdim=True)
    keep = ((s > rtol * smax) & (smax > 0)).to(x.dtype)
    v = vh.transpose(-1, -2) * keep.unsqueeze(-2)  # ... x d x r, dropped directions zeroed
    return v @ v.transpose(-1, -2)


def project_out(
    x: torch.Tensor, rows_idx: Sequence[int], p: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """``X' = X - a X P`` on the rows ``rows_idx`` of ``x`` (``... x L x d``); other rows unchanged.

    ``a = 1`` leaves the chosen rows orthogonal to the range of ``P``; ``a = 0`` is the identity.
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if p.shape[-1] != x.shape[-1] or p.shape[-2] != x.shape[-1]:
        raise ValueError(f"projection is {tuple(p.shape)}, rows have width {x.shape[-1]}")
    idx = _check_positions(rows_idx, x.shape[-2], "rows_idx")
    out = x.clone()
    if not idx or strength == 0:
        return out
    sel = x[..., idx, :].float()
    out[..., idx, :] = (sel - float(strength) * (sel @ p.float())).to(x.dtype)
    return out


def replace_rows(
    x: torch.Tensor,
    positions: Sequence[int],
    x_alone: torch.Tensor,
    alone_positions: Sequence[int],
) -> torch.Tensor:
    """Rows ``positions`` of ``x`` replaced by rows ``alone_positions`` of ``x_alone`` (Follow the Flow).

    Position ``positions[j]`` receives ``x_alone[..., alone_positions[j], :]``;
    every other row is returned unchanged. Batch dimensions broadcast.
    """
    idx = _check_positions(positions, x.shape[-2], "positions")
    src = _check_positions(alone_positions, x_alone.shape[-2], "alone_positions")
    if len(idx) != len(src):
        raise ValueError(f"{len(idx)} positions but {len(src)} alone_positions; they must align")
    if x_alone.shape[-1] != x.shape[-1]:
        raise ValueError(f"widths differ: {x.shape[-1]} vs {x_alone.shape[-1]}")
    out = x.clone()
    if idx:
        out[..., idx, :] = x_alone[..., src, :].to(x.dtype).expand_as(out[..., idx, :])
    return out


def _check_positions(pos: Sequence[int], length: int, what: str) -> list[int]:
    out = [int(p) for p in pos]
    bad = [p for p in out if not 0 <= p < length]
    if bad:
        raise ValueError(f"{what} {bad} out of range for {length} rows")
    return out


# -- words to token positions (tokenizer wrappers over editor.prompts.PromptTokens) -------------


def find_phrase(tokenizer, prompt: str, phrase: str) -> list[list[int]]:
    """Token positions (in the encoder's rows, BOS = 0) of every occurrence of ``phrase``.

    Matches on token ids, ignoring punctuation tokens on both sides, so case,
    commas and hyphens do not matter ("Blue-square," finds "blue square").
    Raises ValueError naming the phrase when it does not occur.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError("protected phrase is empty")
    return P.tokenize(tokenizer, prompt).phrase_spans(P.tokenize(tokenizer, phrase))


def end_positions(tokenizer, prompt: str, length: int) -> list[int]:
    """Rows of the EOS token and the padding after it (``length`` = rows of the encoding)."""
    return P.tokenize(tokenizer, prompt).end_positions(length)


def word_positions(tokenizer, prompt: str) -> list[int]:
    """Rows of the prompt's word tokens (no BOS, EOS, padding or punctuation)."""
    return P.tokenize(tokenizer, prompt).word_positions()


def edited_positions(tokenizer, prompt: str, source_prompt: str) -> list[int]:
    """Word rows of ``prompt`` whose tokens are not matched in ``source_prompt`` (the edited words)."""
    return P.tokenize(tokenizer, prompt).edited_positions(P.tokenize(tokenizer, source_prompt))


def undesired_rows(
    x: torch.Tensor,
    tokenizer,
    prompt: str,
    protected: Sequence[int],
    source_prompt: str | None = None,
    *,
    center: bool = True,
) -> torch.Tensor:
    """The rows whose directions projection removes (``... x k x d``); see the module docstring."""
    pt = P.tokenize(tokenizer, prompt)
    words = pt.word_positions()
    prot = set(protected)
    idx: list[int] = []
    if source_prompt is not None:
        idx = [i for i in pt.edited_positions(P.tokenize(tokenizer, source_prompt))
               if i not in prot]
    if not idx:
        idx = [i for i in words if i not in prot]
    return _centred(x, idx, words, center)


def _centred(x: torch.Tensor, idx: list[int], words: list[int], center: bool) -> torch.Tensor:
    rows = x[..., idx, :].float()
    if center and words:
        rows = rows - x[..., words, :].float().mean(dim=-2, keepdim=True)
    return rows


# -- the controls as the engine uses them -------------------------------------------------------


def _check_control(mode: str, rows: str, strength: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown leakage mode {mode!r}; use one of {', '.join(MODES)}")
    if rows not in ROWS:
        raise ValueError(f"unknown rows {rows!r}; use one of {', '.join(ROWS)}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def apply_protection(encode: Encode, emb: torch.Tensor, plan: ProtectPlan, *, mode: str,
                     strength: float = 1.0, rows: str = "item", center: bool = True,
                     blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Apply a leakage control to ``emb`` (the encoding of ``plan.prompt``, ``[B x] L x D``);
    ``encode`` encodes the phrases alone (the model's text encoder).

    ``blocks``: the widths of the text encoders whose rows are concatenated in ``D`` (SDXL:
    ``[768, 1280]``); replacement swaps whole rows (every encoder's part), projection runs
    in each encoder's own columns (its own undesired directions: the encoders' spaces and
    scales differ). ``None``: one encoder."""
    _check_control(mode, rows, strength)
    if mode == "none" or not plan.phrases:
        return emb
    touched = plan.item + (plan.end if rows == "item+end" else [])
    out = emb
    if mode in ("replace", "both"):
        for phrase, spans, a_span in zip(plan.phrases, plan.spans, plan.alone, strict=True):
            alone = encode([phrase])[0].to(emb.device)
            for s in spans:
                out = replace_rows(out, s, alone, a_span)
        if rows == "item+end":
            alone = encode([plan.joined])[0].to(emb.device)
            out = replace_rows(out, plan.end[: len(plan.joined_end)], alone, plan.joined_end)
    if mode in ("project", "both"):
        widths = list(blocks) if blocks else [emb.shape[-1]]
        if sum(widths) != emb.shape[-1]:
            raise ValueError(f"blocks {widths} do not add up to the rows' width {emb.shape[-1]}")
        parts, lo = [], 0
        for w in widths:
            cols = slice(lo, lo + w)
            bad = _centred(emb[..., cols], plan.undesired, plan.words, center)
            parts.append(project_out(out[..., cols], touched, projection_matrix(bad), strength))
            lo += w
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out


def protect_embeddings(
    model: Model,
    prompt: str,
    emb: torch.Tensor,
    *,
    protect: Sequence[str] | None,
    mode: str = "none",
    source_prompt: str | None = None,
    strength: float = 1.0,
    rows: str = "item",
    center: bool = True,
) -> torch.Tensor:
    """Apply a leakage control to ``emb`` (the encoding of ``prompt``, ``[B x] L x D``).

    ``mode``: ``"none"``; ``"project"`` (DECOR projection of the undesired
    directions out of the touched rows, strength ``a``); ``"replace"`` (the
    protected phrases' rows, and with ``rows="item+end"`` the end rows, are
    taken from the phrases encoded alone); ``"both"`` (replace, then project).
    ``source_prompt`` (editing) makes the undesired directions the edited words.
    """
    _check_control(mode, rows, strength)
    if isinstance(protect, str):
        protect = [protect]
    phrases = [" ".join(p.split()) for p in (protect or [])]
    if mode == "none" or not phrases:
        return emb
    plan = plan_protection(model.pipe.tokenizer, prompt, phrases, emb.shape[-2], source_prompt)
    return apply_protection(model.encode_text, emb, plan, mode=mode, strength=strength,
                            rows=rows, center=center,
                            blocks=model.text_widths if getattr(model, "is_sdxl", False)
                            else None)


# -- reweighting a word's share of the text encoding ---------------------------------------------


@torch.no_grad()
def reweight_rows(encode: Encode, emb: torch.Tensor, steps: Sequence[ReweightStep]) -> torch.Tensor:
    """Scale words' contribution to the whole text encoding (``L x D``), rows aligned by tokens.

    ``X_s = X_without + s (X - X_without)`` with ``s`` clipped to ``[0, 1]``,
    ``X_without`` = the prompt encoded without the word, its rows aligned to the prompt's
    by :func:`editor.prompts.refine_mapper` with in-order padding (the word's own rows keep ``X``; their
    attention is scaled by the P2P equalizer with the unclipped factor). A causal text
    encoder writes every word into all later rows, end and padding rows included; on the
    bundled model those carry most of the attention, so attention column scaling alone
    hardly changes the image (docs/methods.md). The encoding is interpolated, never
    extrapolated: ``s > 1`` leaves the encoder's output range, and on the bundled model
    it turned triangles into circles and squares and added blobs.
    """
    out = emb.float().clone()
    for st in steps:
        x_wo = encode([st.rest])[0].float().to(out.device)
        base = x_wo[st.index.to(out.device)]
        keep = (st.alpha > 0).to(out.device)[:, None]
        s = min(max(float(st.scale), 0.0), 1.0)
        out = torch.where(keep, base + s * (out - base), out)
    return out.to(emb.dtype)


def reweight_embedding(model: Model, prompt: str, emb: torch.Tensor,
                       reweight: Mapping[str, float]) -> torch.Tensor:
    """:func:`reweight_rows` for ``prompt``'s words in ``reweight`` (``{word: scale}``)."""
    tok = model.pipe.tokenizer
    pt = P.tokenize(tok, prompt)
    steps = []
    for word, scale in reweight.items():
        rest = P.without_word(prompt, word)
        index, alpha = P.refine_mapper_of(P.tokenize(tok, rest), pt, emb.shape[0], "in-order")
        steps.append(ReweightStep(word, float(scale), rest, index, alpha))
    return reweight_rows(model.encode_text, emb, steps)
