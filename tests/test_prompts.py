"""Word-to-token alignment and P2P mappers (pure, fast: tokenizer only)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from editor import prompts as P
from editor.model import bundled_model_path

SRC = "a red circle on a white background"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(str(bundled_model_path() / "tokenizer"))


class SlowOnly:
    """A tokenizer wrapper without offsets: forces the decode-and-walk path."""

    def __init__(self, tok):
        self._tok = tok
        self.model_max_length = tok.model_max_length
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError
        return self._tok(text, **kw)

    def decode(self, ids):
        return self._tok.decode(ids)


def test_words_ignore_case_and_punctuation():
    assert P.words("A Red circle, on a WHITE background!") == SRC.split()
    assert P.words("blueish-green") == ["blueish", "green"]


@pytest.mark.parametrize("wrap", [False, True], ids=["offsets", "decode"])
def test_word_tokens_punctuation_and_multi_token(tok, wrap):
    t = SlowOnly(tok) if wrap else tok
    prompt = "a blueish-green squares, on gray!"
    ids = tok(prompt).input_ids
    per_word = P.word_tokens(t, prompt)
    assert len(per_word) == len(P.words(prompt))
    # "blueish" is two tokens (blue + ish); the hyphen and the comma belong to no word
    assert len(per_word[1]) == 2
    pieces = [tok.decode([ids[i]]) for i in per_word[1]]
    assert "".join(pieces) == "blueish"
    covered = {i for ws in per_word for i in ws}
    punct = {i for i, x in enumerate(ids) if tok.decode([x]) in {"-", ",", "!"}}
    assert punct and not covered & punct


@pytest.mark.parametrize("wrap", [False, True], ids=["offsets", "decode"])
def test_word_indices_case_punctuation_repeats(tok, wrap):
    t = SlowOnly(tok) if wrap else tok
    prompt = "a Red circle, on a red background."
    idx = P.word_indices(t, prompt, "RED")
    ids = tok(prompt).input_ids
    assert len(idx) == 2 and all(tok.decode([ids[i]]) == "red" for i in idx)
    assert P.word_indices(t, prompt, "circle,") == P.word_indices(t, prompt, "circle")
    phrase = P.word_indices(t, prompt, "red circle")
    assert phrase == [idx[0], idx[0] + 1]


def test_word_indices_missing_word_raises(tok):
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        P.word_indices(tok, SRC, "dog")
    with pytest.raises(ValueError, match="no word"):
        P.word_indices(tok, SRC, "!!")


def test_replace_mapper_identity_for_same_prompt(tok):
    m = P.replace_mapper(tok, SRC, SRC, 77)
    assert torch.equal(m, torch.eye(77))


def test_replace_mapper_swaps_word_and_splits_multi_token(tok):
    tgt = "a blueish circle on a white background"
    m = P.replace_mapper(tok, SRC, tgt, 77)
    red = P.word_indices(tok, SRC, "red")
    blue = P.word_indices(tok, tgt, "blueish")
    assert len(red) == 1 and len(blue) == 2
    assert torch.allclose(m[red[0], blue], torch.full((2,), 0.5))
    # each source token's attention goes somewhere, split evenly over a multi-token word
    n_src = len(tok(SRC).input_ids)
    assert torch.allclose(m[:n_src].sum(1), torch.ones(n_src))
    # words after the swap shift by one token in the target
    circ_s, circ_t = P.word_indices(tok, SRC, "circle"), P.word_indices(tok, tgt, "circle")
    assert m[circ_s[0], circ_t[0]] == 1
    # end token maps to end token
    n_s, n_t = len(tok(SRC).input_ids), len(tok(tgt).input_ids)
    assert m[n_s - 1, n_t - 1] == 1


def test_replace_mapper_word_count_mismatch_mentions_refine(tok):
    with pytest.raises(ValueError, match="refine"):
        P.replace_mapper(tok, SRC, "a big red circle on a white background", 77)


def test_over_long_prompt_raises(tok):
    long = " ".join(["red"] * 100)
    with pytest.raises(ValueError, match="too long"):
        P.refine_mapper(tok, SRC, long, 77)
    with pytest.raises(ValueError, match="too long"):
        P.replace_mapper(tok, long, long, 77)


def test_global_alignment_gaps_and_matches():
    assert P.global_alignment([1, 2, 3, 4], [1, 2, 9, 3, 4]) == [0, 1, -1, 2, 3]
    assert P.global_alignment([1, 2, 9, 3], [1, 2, 3]) == [0, 1, 3]
    assert P.global_alignment([5, 6], [7]) == [-1]


def test_refine_mapper_new_word_keeps_own_attention(tok):
    tgt = "a big red circle on a white background"
    index, alpha = P.refine_mapper(tok, SRC, tgt, 77)
    big = P.word_indices(tok, tgt, "big")
    assert alpha[big].tolist() == [0.0]
    red_s, red_t = P.word_indices(tok, SRC, "red"), P.word_indices(tok, tgt, "red")
    assert index[red_t[0]] == red_s[0] and alpha[red_t[0]] == 1
    assert alpha.sum() == 76
    # padding: the published mapper sends target position j to source position j;
    # "in-order" (the text reweighting's alignment) sends it to the source's padding in order
    n_s, n_t = len(tok(SRC).input_ids), len(tok(tgt).input_ids)
    assert index[n_t:].tolist() == list(range(n_t, 77))
    in_order, _ = P.refine_mapper(tok, SRC, tgt, 77, padding="in-order")
    assert in_order[n_t] == n_s and in_order[:n_t].tolist() == index[:n_t].tolist()


def test_plan_edit_modes_and_changed_words(tok):
    plan = P.plan_edit(tok, SRC, "a blue circle on a white background")
    assert plan.mode == "replace"
    assert (plan.changed_source, plan.changed_target) == (["red"], ["blue"])
    plan = P.plan_edit(tok, SRC, "a big red circle on a white background")
    assert plan.mode == "refine" and plan.changed_target == ["big"] and plan.changed_source == []
    plan = P.plan_edit(tok, "a big red circle on a white background", SRC)
    assert plan.mode == "refine" and plan.changed_source == ["big"]
    assert P.plan_edit(tok, SRC, SRC, mode="refine").mode == "refine"
    with pytest.raises(ValueError, match="unknown mode"):
        P.detect_mode(SRC, SRC, "swap")


def test_mapper_matrix_matches_index(tok):
    index, alpha = P.refine_mapper(tok, SRC, "a big red circle on a white background", 77)
    m = P.mapper_matrix(index, alpha)
    attn = torch.rand(3, 77)
    got = attn @ m
    want = attn[:, index] * (alpha > 0)
    assert torch.allclose(got, want)
