"""Word-to-token alignment and the Prompt-to-Prompt token mappers (Hertz et al. 2022, sec. 3.2).

All functions are pure: they take the tokenizer (any ``transformers`` tokenizer
with start/end tokens, e.g. CLIP's) and plain strings.

*Words* are runs of letters and digits (``[^\\W_]+``), compared case-insensitively;
punctuation belongs to no word, so ``"circle,"`` is the word ``circle`` and
``"blueish-green"`` is the two words ``blueish`` and ``green``. Token positions
are positions in the padded encoder input (the start token is position 0).

- :func:`replace_mapper` - word swap (same word count): an ``L x L`` matrix ``M``
  with ``new_attn[..., j] = sum_i attn_src[..., i] * M[i, j]``; a word split into
  ``n`` target tokens gives each ``1/n`` of the source word's attention.
- :func:`refine_mapper` - words added/removed: global alignment of the token ids
  (Needleman-Wunsch; gap 0, match 1, mismatch -1); target tokens without a match
  keep their own attention (``alpha = 0``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import torch

WORD_RE = re.compile(r"[^\W_]+")
MODES = ("auto", "replace", "refine")


def normalize(text: str) -> str:
    """Case-folded, NFKC-normalised text (how words are compared)."""
    return unicodedata.normalize("NFKC", text).casefold()


def split_words(prompt: str) -> list[tuple[str, int, int]]:
    """Words of ``prompt`` as ``(normalised word, char start, char end)``."""
    return [(normalize(m.group()), m.start(), m.end()) for m in WORD_RE.finditer(prompt)]


def words(prompt: str) -> list[str]:
    """Normalised words of ``prompt`` (punctuation dropped)."""
    return [w for w, _, _ in split_words(prompt)]


def token_ids(tok, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with start and end tokens, unpadded."""
    return list(tok(prompt).input_ids)


def _token_char_spans(tok, prompt: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of every token of ``ids`` in ``prompt`` ((0, 0) for special tokens).

    Uses the fast tokenizer's offsets; otherwise decodes token by token and walks the
    prompt (whitespace skipped, comparison case-insensitive).
    """
    try:
        enc = tok(prompt, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        if list(enc.input_ids) == ids and len(offsets) == len(ids):
            return offsets
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    special = set(getattr(tok, "all_special_ids", []))
    low = normalize(prompt)
    spans, pos = [], 0
    for tid in ids:
        if tid in special:
            spans.append((0, 0))
            continue
        piece = normalize(tok.decode([tid])).strip()
        while pos < len(low) and low[pos].isspace():
            pos += 1
        if piece and low.startswith(piece, pos):
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        else:  # undecodable fragment (e.g. a split multi-byte character): one char
            spans.append((pos, min(pos + max(len(piece), 1), len(low))))
            pos = spans[-1][1]
    return spans


def word_tokens(tok, prompt: str) -> list[list[int]]:
    """Token positions (start token = 0) of each word of ``prompt``, in word order."""
    ids = token_ids(tok, prompt)
    spans = _token_char_spans(tok, prompt, ids)
    out = []
    for _, ws, we in split_words(prompt):
        out.append([i for i, (s, e) in enumerate(spans) if e > s and s < we and e > ws])
    return out


def word_indices(tok, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (a word or a phrase) in ``prompt``.

    Matching ignores case and punctuation; raises ``ValueError`` when it is absent.
    """
    query = words(word)
    if not query:
        raise ValueError(f"{word!r} contains no word (letters or digits)")
    pw = words(prompt)
    per_word = word_tokens(tok, prompt)
    found: list[int] = []
    n = len(query)
    for k in range(len(pw) - n + 1):
        if pw[k : k + n] == query:
            for toks in per_word[k : k + n]:
                found.extend(toks)
    if not found:
        raise ValueError(f"word {word!r} is not in the prompt {prompt!r} (its words: {', '.join(pw)})")
    return sorted(set(found))


def _check_len(tok, prompt: str, max_len: int) -> list[int]:
    ids = token_ids(tok, prompt)
    if len(ids) > max_len:
        raise ValueError(
            f"prompt {prompt!r} is too long: {len(ids)} tokens, the text encoder takes at most "
            f"{max_len} (including start and end tokens)"
        )
    return ids


def replace_mapper(tok, src: str, tgt: str, max_len: int) -> torch.Tensor:
    """Word-swap mapper ``M`` (``max_len x max_len``): ``attn_tgt[..., j] = sum_i attn_src[..., i] M[i, j]``.

    Source and target must have the same number of words. Each word pair (and each
    run of punctuation between words, the start token and the end/padding tail) is
    a block; equal-length blocks map one to one, otherwise every target token of the
    block gets ``1/n`` (n = its target token count) of the block's source attention.
    """
    sw, tw = words(src), words(tgt)
    if len(sw) != len(tw):
        raise ValueError(
            f"a replace edit needs the same number of words in source and target "
            f"({len(sw)} in {src!r}, {len(tw)} in {tgt!r}); mode='refine' (or 'auto') handles "
            "added or removed words"
        )
    src_ids, tgt_ids = _check_len(tok, src, max_len), _check_len(tok, tgt, max_len)
    src_blocks, tgt_blocks = _blocks(tok, src, src_ids), _blocks(tok, tgt, tgt_ids)
    m = torch.zeros(max_len, max_len)
    for s, t in zip(src_blocks, tgt_blocks, strict=True):
        if not s or not t:
            continue  # punctuation present on one side only: nothing to map
        if len(s) == len(t):
            m[s, t] = 1.0
        else:
            for j in t:
                m[s, j] = 1.0 / len(t)
    # end token + padding: in order; extra target positions read the last source position
    s_tail = list(range(len(src_ids) - 1, max_len))
    t_tail = list(range(len(tgt_ids) - 1, max_len))
    for k, j in enumerate(t_tail):
        m[s_tail[min(k, len(s_tail) - 1)], j] = 1.0
    return m


def _blocks(tok, prompt: str, ids: list[int]) -> list[list[int]]:
    """[start token], then per word: [punctuation before it], [its tokens]; then [trailing punctuation]."""
    per_word = word_tokens(tok, prompt)
    blocks: list[list[int]] = [[0]]
    pos = 1
    for toks in per_word:
        first = toks[0] if toks else pos
        blocks.append(list(range(pos, first)))
        blocks.append(toks)
        pos = (toks[-1] + 1) if toks else pos
    blocks.append(list(range(pos, len(ids) - 1)))
    return blocks


def global_alignment(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x`` (gap 0, match 1, mismatch -1).

    Returns, for every position of ``y``, the aligned position in ``x`` or ``-1``.
    Only equal ids are aligned (a mismatch, -1, never beats two gaps, 0); ties
    prefer a match, then the earlier source position.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi = x[i - 1]
        row, prev = score[i], score[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (1 if xi == y[j - 1] else -1)
            row[j] = max(diag, prev[j], row[j - 1])
    out = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(tok, src: str, tgt: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mapper (P2P "refine"): ``(index, alpha)``, both of length ``max_len``.

    ``attn_tgt[..., j] = alpha[j] * attn_src[..., index[j]] + (1 - alpha[j]) * attn_tgt[..., j]``;
    ``alpha[j] = 0`` for target tokens with no match in the source (new words).
    End and padding tokens map in order.
    """
    x, y = _check_len(tok, src, max_len), _check_len(tok, tgt, max_len)
    align = global_alignment(x, y)
    index = torch.zeros(max_len, dtype=torch.long)
    alpha = torch.ones(max_len)
    for j, i in enumerate(align):
        index[j] = max(i, 0)
        alpha[j] = float(i >= 0)
    for k, j in enumerate(range(len(y), max_len)):
        index[j] = min(len(x) + k, max_len - 1)
    return index, alpha


def mapper_matrix(index: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A refine mapper as an ``L x L`` matrix (``M[index[j], j] = 1`` where ``alpha[j] > 0``)."""
    n = index.shape[0]
    m = torch.zeros(n, n)
    m[index, torch.arange(n)] = (alpha > 0).float()
    return m


def detect_mode(src: str, tgt: str, mode: str = "auto") -> str:
    """``auto``: ``replace`` when the word counts match, else ``refine``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "replace" if len(words(src)) == len(words(tgt)) else "refine"


@dataclass
class EditPlan:
    """How one target prompt relates to the source prompt.

    ``mapper`` (``L x L``) moves source attention columns to target columns;
    ``alpha`` (``L``) is 1 where the target token takes the mapped source attention,
    0 where it keeps its own (new words in refine mode). ``changed_source`` and
    ``changed_target`` are the words that differ (used for automatic local blending).
    """

    source: str
    target: str
    mode: str
    mapper: torch.Tensor
    alpha: torch.Tensor
    changed_source: list[str] = field(default_factory=list)
    changed_target: list[str] = field(default_factory=list)


def plan_edit(tok, src: str, tgt: str, mode: str = "auto", max_len: int | None = None) -> EditPlan:
    """Mapper, token alphas and changed words for editing ``src`` into ``tgt``."""
    max_len = int(max_len or tok.model_max_length)
    mode = detect_mode(src, tgt, mode)
    sw, tw = words(src), words(tgt)
    if mode == "replace":
        mapper = replace_mapper(tok, src, tgt, max_len)
        alpha = torch.ones(max_len)
        pairs = [(a, b) for a, b in zip(sw, tw, strict=True) if a != b]
        changed_s, changed_t = [a for a, _ in pairs], [b for _, b in pairs]
    else:
        index, alpha = refine_mapper(tok, src, tgt, max_len)
        mapper = mapper_matrix(index, alpha)
        y = token_ids(tok, tgt)
        new_tok = {j for j in range(len(y)) if alpha[j] == 0}
        changed_t = [w for w, toks in zip(tw, word_tokens(tok, tgt), strict=True)
                     if set(toks) & new_tok]
        used = {int(index[j]) for j in range(len(y)) if alpha[j] > 0}
        changed_s = [w for w, toks in zip(sw, word_tokens(tok, src), strict=True)
                     if toks and not set(toks) & used]
    return EditPlan(src, tgt, mode, mapper, alpha, _unique(changed_s), _unique(changed_t))


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))
