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

import difflib
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


def check_aligned(tok, tok2, prompt: str) -> None:
    """Refuse a prompt the two tokenizers of a two-encoder model (SDXL) split differently.

    Everything downstream (P2P mappers, blend and reweight columns, protected rows) names
    token *positions* found with the first tokenizer and applies them to both encoders'
    rows; that holds when both give as many tokens and the same tokens per word. SDXL's
    share the CLIP BPE and differ in the padding token, which comes after the end token,
    and in one id: the second's padding token is ``"!"``, so a ``"!"`` in the prompt
    becomes that token there (id 0, not 256): same position, other id, accepted."""
    a, b = tokenize(tok, prompt), tokenize(tok2, prompt)
    if len(a.ids) != len(b.ids) or a.word_tokens != b.word_tokens:
        n = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids, strict=False)) if x != y),
                 min(len(a.ids), len(b.ids)))
        raise ValueError(
            f"the model's two tokenizers split the prompt {prompt!r} differently (from token "
            f"{n}: {len(a.ids)} vs {len(b.ids)} tokens); word positions would not align across "
            "its two text encoders")


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
    return [list(t) for t in tokenize(tok, prompt).word_tokens]


def word_indices(tok, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (a word or a phrase) in ``prompt``.

    Matching ignores case and punctuation; raises ``ValueError`` when it is absent.
    """
    return tokenize(tok, prompt).positions(word)


_LETTER = re.compile(r"[0-9a-z]", re.IGNORECASE)


@dataclass(frozen=True)
class PromptTokens:
    """One prompt resolved against the tokenizer, once: everything later steps need.

    ``ids``: token ids with start and end tokens, unpadded; ``words``: normalised words;
    ``word_tokens``: token positions of each word (P2P's word matching, by characters);
    ``lettered``: per token, whether it holds a letter or digit (the leakage controls'
    phrase matching, by token ids; ``None`` for a tokenizer without
    ``convert_ids_to_tokens``).
    """

    text: str
    ids: tuple[int, ...]
    words: tuple[str, ...]
    word_tokens: tuple[tuple[int, ...], ...]
    lettered: tuple[bool, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, word: str) -> list[int]:
        """Token positions of every occurrence of ``word`` (a word or phrase; case and
        punctuation ignored); ``ValueError`` naming the prompt's words when absent."""
        query = words(word)
        if not query:
            raise ValueError(f"{word!r} contains no word (letters or digits)")
        pw = list(self.words)
        found: list[int] = []
        n = len(query)
        for k in range(len(pw) - n + 1):
            if pw[k : k + n] == query:
                for toks in self.word_tokens[k : k + n]:
                    found.extend(toks)
        if not found:
            raise ValueError(f"word {word!r} is not in the prompt {self.text!r} "
                             f"(its words: {', '.join(pw)})")
        return sorted(set(found))

    def has(self, word: str) -> bool:
        try:
            self.positions(word)
            return True
        except ValueError:
            return False

    # -- token-id matching (leakage controls) ------------------------------------------------

    def _flags(self) -> tuple[bool, ...]:
        if self.lettered is None:
            raise ValueError("this tokenizer cannot name its tokens (no convert_ids_to_tokens)")
        return self.lettered

    def phrase_spans(self, phrase: PromptTokens) -> list[list[int]]:
        """Token positions of every occurrence of ``phrase`` (tokenized alone), matching token
        ids and ignoring punctuation tokens on both sides."""
        needle = [i for i, w in zip(phrase.ids, phrase._flags(), strict=True) if w]
        if not needle:
            raise ValueError(f"protected phrase {phrase.text!r} has no words")
        hay = [(pos, i) for pos, (i, w) in enumerate(zip(self.ids, self._flags(), strict=True))
               if w]
        spans = []
        for s in range(len(hay) - len(needle) + 1):
            if [i for _, i in hay[s : s + len(needle)]] == needle:
                spans.append(list(range(hay[s][0], hay[s + len(needle) - 1][0] + 1)))
        if not spans:
            raise ValueError(f"protected phrase {phrase.text!r} is not in the prompt {self.text!r}")
        return spans

    def end_positions(self, length: int) -> list[int]:
        """Rows of the end token and the padding after it (``length`` = rows of the encoding)."""
        return list(range(min(len(self.ids), length) - 1, length))

    def word_positions(self) -> list[int]:
        """Rows of the word tokens (no start, end, padding or punctuation)."""
        return [i for i, w in enumerate(self._flags()) if w]

    def edited_positions(self, source: PromptTokens) -> list[int]:
        """Word rows whose tokens are not matched in ``source`` (the edited words)."""
        same: set[int] = set()
        sm = difflib.SequenceMatcher(None, list(source.ids), list(self.ids), autojunk=False)
        for blk in sm.get_matching_blocks():
            same.update(range(blk.b, blk.b + blk.size))
        return [i for i, w in enumerate(self._flags()) if w and i not in same]


def tokenize(tok, prompt: str) -> PromptTokens:
    """Resolve ``prompt`` against ``tok`` once (see :class:`PromptTokens`)."""
    ids = token_ids(tok, prompt)
    spans = _token_char_spans(tok, prompt, ids)
    per_word = []
    for _, ws, we in split_words(prompt):
        per_word.append(tuple(i for i, (s, e) in enumerate(spans) if e > s and s < we and e > ws))
    lettered = None
    if hasattr(tok, "convert_ids_to_tokens"):
        names = tok.convert_ids_to_tokens(ids)
        flags = [bool(_LETTER.search(t.replace("</w>", ""))) for t in names]
        flags[0] = flags[-1] = False  # start / end tokens
        lettered = tuple(flags)
    return PromptTokens(prompt, tuple(ids), tuple(words(prompt)), tuple(per_word), lettered)


def without_word(prompt: str, word: str) -> str:
    """``prompt`` with every occurrence of ``word`` (a word or phrase, any case) removed."""
    spans = split_words(prompt)
    query = words(word)
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


def check_length(pt: PromptTokens, max_len: int) -> list[int]:
    """The prompt's ids, or ``ValueError`` when they do not fit the encoder's window."""
    if len(pt.ids) > max_len:
        raise ValueError(
            f"prompt {pt.text!r} is too long: {len(pt.ids)} tokens, the text encoder takes at "
            f"most {max_len} (including start and end tokens)"
        )
    return list(pt.ids)


def replace_mapper(tok, src: str, tgt: str, max_len: int) -> torch.Tensor:
    """Word-swap mapper for two prompts; see :func:`replace_mapper_of`."""
    return replace_mapper_of(tokenize(tok, src), tokenize(tok, tgt), max_len)


def replace_mapper_of(src: PromptTokens, tgt: PromptTokens, max_len: int) -> torch.Tensor:
    """Word-swap mapper ``M`` (``max_len x max_len``): ``attn_tgt[..., j] = sum_i attn_src[..., i] M[i, j]``.

    Source and target must have the same number of words. Each word pair (and each
    run of punctuation between words, the start token and the end/padding tail) is
    a block; equal-length blocks map one to one, otherwise every target token of the
    block gets ``1/n`` (n = its target token count) of the block's source attention.
    """
    sw, tw = src.words, tgt.words
    if len(sw) != len(tw):
        raise ValueError(
            f"a replace edit needs the same number of words in source and target "
            f"({len(sw)} in {src.text!r}, {len(tw)} in {tgt.text!r}); mode='refine' (or 'auto') "
            "handles added or removed words"
        )
    src_ids, tgt_ids = check_length(src, max_len), check_length(tgt, max_len)
    m = torch.zeros(max_len, max_len)
    for s, t in zip(_blocks(src), _blocks(tgt), strict=True):
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


def _blocks(pt: PromptTokens) -> list[list[int]]:
    """[start token], then per word: [punctuation before it], [its tokens]; then [trailing punctuation]."""
    blocks: list[list[int]] = [[0]]
    pos = 1
    for toks in pt.word_tokens:
        first = toks[0] if toks else pos
        blocks.append(list(range(pos, first)))
        blocks.append(list(toks))
        pos = (toks[-1] + 1) if toks else pos
    blocks.append(list(range(pos, len(pt.ids) - 1)))
    return blocks


def global_alignment(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x`` (gap 0, match 1, mismatch -1), with the
    published prompt-to-prompt traceback (``seq_aligner.global_align``): at a tie the cell
    records a gap in ``x`` first, then a gap in ``y``, then the diagonal.

    Returns, for every position of ``y``, the aligned position in ``x`` or ``-1``. Only
    equal ids are ever aligned (a mismatch, -1, never beats a gap, 0).
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    for i in range(1, n + 1):
        xi, row, prev, tr = x[i - 1], score[i], score[i - 1], trace[i]
        for j in range(1, m + 1):
            left, up = row[j - 1], prev[j]
            diag = prev[j - 1] + (1 if xi == y[j - 1] else -1)
            best = max(left, up, diag)
            row[j] = best
            tr[j] = 1 if best == left else 2 if best == up else 3
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif t == 1:
            j -= 1
        else:
            i -= 1
    return out


PADDING = ("published", "in-order")


def refine_mapper(tok, src: str, tgt: str, max_len: int, padding: str = "published"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mapper for two prompts; see :func:`refine_mapper_of`."""
    return refine_mapper_of(tokenize(tok, src), tokenize(tok, tgt), max_len, padding)


def refine_mapper_of(src: PromptTokens, tgt: PromptTokens, max_len: int,
                     padding: str = "published") -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mapper (P2P "refine"): ``(index, alpha)``, both of length ``max_len``.

    ``attn_tgt[..., j] = alpha[j] * attn_src[..., index[j]] + (1 - alpha[j]) * attn_tgt[..., j]``;
    ``alpha[j] = 0`` for target tokens with no match in the source (new words). The prompt's
    own tokens (start and end included) are aligned by :func:`global_alignment`; the padding
    after the target's end token maps, with ``padding="published"`` (P2P's
    ``seq_aligner.get_mapper``), to the same position in the source (``j -> j``), with
    ``"in-order"`` to the source's padding in order (``j -> len(src) + (j - len(tgt))``,
    what the text reweighting uses to align two encodings row by row).
    """
    if padding not in PADDING:
        raise ValueError(f"unknown padding rule {padding!r}; use one of {', '.join(PADDING)}")
    x, y = check_length(src, max_len), check_length(tgt, max_len)
    align = global_alignment(x, y)
    index = torch.zeros(max_len, dtype=torch.long)
    alpha = torch.ones(max_len)
    for j, i in enumerate(align):
        index[j] = max(i, 0)
        alpha[j] = float(i >= 0)
    for k, j in enumerate(range(len(y), max_len)):
        index[j] = j if padding == "published" else min(len(x) + k, max_len - 1)
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
class TargetPlan:
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
    tokens: PromptTokens | None = None


#: Older name of :class:`TargetPlan`.
EditPlan = TargetPlan


def plan_edit(tok, src: str, tgt: str, mode: str = "auto", max_len: int | None = None) -> TargetPlan:
    """Mapper, token alphas and changed words for editing ``src`` into ``tgt``."""
    max_len = int(max_len or tok.model_max_length)
    return plan_target(tokenize(tok, src), tokenize(tok, tgt), mode, max_len)


def plan_target(src: PromptTokens, tgt: PromptTokens, mode: str, max_len: int) -> TargetPlan:
    """:func:`plan_edit` on prompts already resolved."""
    mode = detect_mode(src.text, tgt.text, mode)
    sw, tw = src.words, tgt.words
    if mode == "replace":
        mapper = replace_mapper_of(src, tgt, max_len)
        alpha = torch.ones(max_len)
        pairs = [(a, b) for a, b in zip(sw, tw, strict=True) if a != b]
        changed_s, changed_t = [a for a, _ in pairs], [b for _, b in pairs]
    else:
        index, alpha = refine_mapper_of(src, tgt, max_len)
        mapper = mapper_matrix(index, alpha)
        new_tok = {j for j in range(len(tgt.ids)) if alpha[j] == 0}
        changed_t = [w for w, toks in zip(tw, tgt.word_tokens, strict=True) if set(toks) & new_tok]
        used = {int(index[j]) for j in range(len(tgt.ids)) if alpha[j] > 0}
        changed_s = [w for w, toks in zip(sw, src.word_tokens, strict=True)
                     if toks and not set(toks) & used]
    return TargetPlan(src.text, tgt.text, mode, mapper, alpha, _unique(changed_s),
                      _unique(changed_t), tgt)


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))
