"""An edit's prompts resolved once: the plan every later stage reads instead of the tokenizer.

:func:`plan_edit` tokenizes the source and each target once (:func:`editor.prompts.tokenize`)
and derives, in one pass, everything the edit needs from the words: per target the P2P
mapper and token alphas (:class:`editor.prompts.TargetPlan`), the words that differ, the
token weights of the local blend's words and of the subtracted words, the reweight
columns (equalizer) and the prompts-without-the-word of the text reweighting, the
protected phrases' rows for the leakage controls, and the per-word injection windows.
The result is plain data (:class:`EditPlan`); nothing downstream touches the tokenizer.

Every word an option names is checked here, with the prompts at hand: a word that is in
no prompt is a ``ValueError`` naming the option, the word and the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import prompts as P
from .options import EditOptions, Window
from .prompts import PromptTokens, TargetPlan


def step_window(value: Window, n: int) -> tuple[int, int]:
    """A fraction ``f`` (= ``(0, f)``) or a ``(start, end)`` pair of fractions -> the step
    range ``[int(start * n), int(end * n))``, as the published code rounds (cross-attention
    windows with ``n = steps + 1``, self-attention with ``n = steps``)."""
    lo, hi = (0.0, float(value)) if isinstance(value, (int, float)) else map(float, value)
    return int(lo * n), int(hi * n)


@dataclass
class ReweightStep:
    """One word's share of a target's text encoding (:func:`editor.embeddings.reweight_rows`):
    the prompt without the word, encoded, aligned to the target by ``index`` / ``alpha``."""

    word: str
    scale: float
    rest: str
    index: torch.Tensor
    alpha: torch.Tensor


@dataclass
class ProtectPlan:
    """The rows a leakage control touches in one prompt (:mod:`editor.embeddings`).

    ``spans``: per protected phrase, every occurrence's rows; ``alone``: the phrase's rows
    when it is encoded alone; ``item``: all protected rows; ``end``: the end and padding
    rows; ``joined``/``joined_end``: the phrases joined by "and" and their end rows (the
    ``item+end`` variant); ``undesired``: rows whose directions projection removes;
    ``words``: the prompt's word rows (projection centres on their mean); ``source``: the
    source prompt the undesired rows were taken against (editing), if any.
    """

    prompt: str
    phrases: list[str]
    spans: list[list[list[int]]]
    alone: list[list[int]]
    item: list[int]
    end: list[int]
    joined: str
    joined_end: list[int]
    undesired: list[int]
    words: list[int]
    source: str | None = None


def plan_protection(tok, prompt: str | PromptTokens, phrases: Sequence[str], length: int,
                    source: str | PromptTokens | None = None) -> ProtectPlan:
    """Resolve ``phrases`` in ``prompt`` for a leakage control (``length`` = encoder rows)."""
    pt = prompt if isinstance(prompt, PromptTokens) else P.tokenize(tok, prompt)
    src = source if source is None or isinstance(source, PromptTokens) else P.tokenize(tok, source)
    spans, alone = [], []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError("protected phrase is empty")
        alone_pt = P.tokenize(tok, phrase)
        spans.append(pt.phrase_spans(alone_pt))
        alone.append(alone_pt.phrase_spans(alone_pt)[0])
    item = sorted({i for ss in spans for s in ss for i in s})
    end = pt.end_positions(length)
    joined = " and ".join(phrases)
    joined_end = P.tokenize(tok, joined).end_positions(length)[: len(end)]
    words = pt.word_positions()
    prot = set(item)
    undesired: list[int] = []
    if src is not None:
        undesired = [i for i in pt.edited_positions(src) if i not in prot]
    if not undesired:
        undesired = [i for i in words if i not in prot]
    return ProtectPlan(pt.text, list(phrases), spans, alone, item, end, joined, joined_end,
                       undesired, words, None if src is None else src.text)


@dataclass
class EditPlan:
    """One edit of ``source`` into ``targets`` with ``options``, resolved (see the module)."""

    source: PromptTokens
    targets: list[TargetPlan]
    options: EditOptions
    max_len: int
    blend_rows: list[list[str]]
    blend_auto: bool
    mask_source: str | None
    add: torch.Tensor
    sub: torch.Tensor
    equalizer: torch.Tensor | None
    reweight_text: list[list[ReweightStep]]
    protect: list[ProtectPlan | None]
    _cross_words: dict[str, list[list[int] | None]] = field(default_factory=dict, repr=False)

    @property
    def prompts(self) -> list[str]:
        """Source first, then the targets."""
        return [self.source.text, *(t.target for t in self.targets)]

    @property
    def rows(self) -> int:
        return 1 + len(self.targets)

    def mapper(self) -> torch.Tensor:
        return torch.stack([t.mapper for t in self.targets])

    def token_alpha(self) -> torch.Tensor:
        return torch.stack([t.alpha for t in self.targets])

    def cross_alpha(self, steps: int) -> torch.Tensor:
        """``(steps + 1) x K x L`` injection weights, as P2P's
        ``get_time_words_attention_alpha`` (windows ``int(f * (steps + 1))``; per-word windows
        override the default one on the word's tokens)."""
        cr = self.options.cross_replace
        per_word = {k: v for k, v in cr.items() if k != "default_"} if isinstance(cr, Mapping) else {}
        default = cr.get("default_", 1.0) if isinstance(cr, Mapping) else cr
        lo, hi = step_window(default, steps + 1)
        alpha = torch.zeros(steps + 1, len(self.targets), self.max_len)
        alpha[lo:hi] = 1.0
        for word, win in per_word.items():
            w_lo, w_hi = step_window(win, steps + 1)
            for k, idx in enumerate(self._cross_words[word]):
                if idx is None:
                    continue
                alpha[:, k, idx] = 0.0
                alpha[w_lo:w_hi, k, idx] = 1.0
        return alpha

    def self_window(self, steps: int) -> tuple[int, int]:
        """Steps with injected self-attention, ``[int(start * steps), int(end * steps))``."""
        return step_window(self.options.self_replace, steps)


def _check_present(pts: Sequence[PromptTokens], words: Sequence[str], what: str) -> None:
    for word in words:
        if not any(pt.has(word) for pt in pts):
            raise ValueError(
                f"{what} word {word!r} is not in the prompt {pts[0].text!r}"
                + (f" or the target {pts[1].text!r}" if len(pts) == 2 else " or any target")
            )


def _weights(rows: Sequence[PromptTokens], per_row: Sequence[Sequence[str]], max_len: int
             ) -> torch.Tensor:
    """``rows x L`` token weights: 1 on the tokens of each row's words (missing words skipped)."""
    w = torch.zeros(len(rows), max_len)
    for r, (pt, wordlist) in enumerate(zip(rows, per_row, strict=True)):
        for word in wordlist:
            if pt.has(word):
                w[r, pt.positions(word)] = 1.0
    return w


def plan_edit(tok, source: str, targets: Sequence[str], options: EditOptions,
              max_len: int) -> EditPlan:
    """Resolve an edit (see the module docstring). Prompts must already be checked
    (:meth:`editor.model.Model.check_prompt`)."""
    if not targets:
        raise ValueError("give at least one target prompt")
    o = options
    src = P.tokenize(tok, source)
    tgts = [P.tokenize(tok, t) for t in targets]
    plans = [P.plan_target(src, t, o.mode, max_len) for t in tgts]
    everything = [src, *tgts]

    # per-word injection windows: the words' rows in each target
    cross_words: dict[str, list[list[int] | None]] = {}
    if isinstance(o.cross_replace, Mapping):
        for word in o.cross_replace:
            if word == "default_":
                continue
            rows = [t.positions(word) if t.has(word) else None for t in tgts]
            if all(r is None for r in rows):
                raise ValueError(f"cross_replace word {word!r} is not in the target prompt "
                                 f"{tgts[0].text!r}")
            cross_words[word] = rows

    # reweighting: attention columns, and the word's share of each target's text encoding
    eq = None
    if o.reweight:
        eq = torch.ones(len(tgts), max_len)
        for word, scale in o.reweight.items():
            hits = [k for k, t in enumerate(tgts) if t.has(word)]
            if not hits:
                tgts[0].positions(word)  # raises: the word is not in the prompt
            for k in hits:
                eq[k, tgts[k].positions(word)] = scale
    reweight_text: list[list[ReweightStep]] = [[] for _ in tgts]
    if o.reweight and o.reweight_text:
        for k, t in enumerate(tgts):
            for word, scale in o.reweight.items():
                if t.has(word):
                    rest = P.without_word(t.text, word)
                    index, alpha = P.refine_mapper_of(P.tokenize(tok, rest), t, max_len, "in-order")
                    reweight_text[k].append(ReweightStep(word, scale, rest, index, alpha))

    # local blending: which words, per row (source row first)
    if o.blend_words == "auto":
        src_words = sorted({w for p in plans for w in p.changed_source})
        per_row = [src_words] + [p.changed_target for p in plans]
        if not any(per_row) and o.reweight:
            per_row = [list(o.reweight)] * len(everything)
        mask_source = "noise" if o.blend_mask == "auto" else o.blend_mask
    else:
        words = list(o.blend_words or ())
        _check_present(everything, words, "blend_words")
        per_row = [words] * len(everything)
        mask_source = "attention" if o.blend_mask == "auto" else o.blend_mask
    if not o.blends:
        mask_source = None
    subtract = list(o.blend_subtract)
    _check_present(everything, subtract, "blend_subtract")

    # leakage controls: the protected phrases' rows in each target that has them
    protect: list[ProtectPlan | None] = [None] * len(tgts)
    if o.protect and o.leakage != "none":
        _check_present(tgts, o.protect, "protect")
        for k, t in enumerate(tgts):
            here = [p for p in o.protect if t.has(p)]
            if here:
                protect[k] = plan_protection(tok, t, here, max_len, src)

    return EditPlan(
        source=src, targets=plans, options=o, max_len=max_len, blend_rows=per_row,
        blend_auto=o.blend_words == "auto", mask_source=mask_source,
        add=_weights(everything, per_row, max_len),
        sub=_weights(everything, [subtract] * len(everything), max_len),
        equalizer=eq, reweight_text=reweight_text, protect=protect, _cross_words=cross_words)
