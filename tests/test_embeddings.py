"""Mathematics of the leakage controls (editor/embeddings.py); no diffusion model needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from editor import GenerateOptions
from editor.embeddings import (
    edited_positions,
    end_positions,
    find_phrase,
    project_out,
    projection_matrix,
    protect_embeddings,
    replace_rows,
    undesired_rows,
)
from editor.model import bundled_model_path

WIDTHS = [64, 768]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(bundled_model_path() / "tokenizer"))


class ToyEditor:
    """Stands in for Editor: the real CLIP tokenizer and a causal toy encoder (prefix means)."""

    def __init__(self, tokenizer, width: int = 64, length: int = 77):
        self.pipe = SimpleNamespace(tokenizer=tokenizer)
        self.table = torch.randn(tokenizer.vocab_size + 2, width, generator=torch.Generator().manual_seed(0))
        self.length = length

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.length,
                                  return_tensors="pt").input_ids
        e = self.table[ids]
        return e.cumsum(1) / torch.arange(1, self.length + 1)[None, :, None]


@pytest.mark.parametrize("d", WIDTHS)
def test_projection_is_idempotent_symmetric_and_has_the_rank_of_the_rows(d):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, d, generator=g)
    p = projection_matrix(rows)
    assert p.shape == (d, d)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-6, rtol=0)
    assert round(float(torch.trace(p))) == 5
    torch.testing.assert_close(rows @ p, rows, atol=1e-4, rtol=0)  # rows lie in its range


@pytest.mark.parametrize("d", WIDTHS)
def test_full_strength_leaves_chosen_rows_orthogonal_and_others_untouched(d):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, d, generator=g)  # batch of 2
    bad = torch.randn(3, d, generator=g)
    out = project_out(x, [4, 5, 11], projection_matrix(bad), strength=1.0)
    assert out.shape == x.shape
    assert (out[..., [4, 5, 11], :] @ bad.T).abs().max() < 1e-4
    keep = [i for i in range(12) if i not in (4, 5, 11)]
    assert torch.equal(out[..., keep, :], x[..., keep, :])
    # the removed part is exactly the component along the undesired span
    again = project_out(out, [4, 5, 11], projection_matrix(bad), strength=1.0)
    torch.testing.assert_close(again, out, atol=1e-5, rtol=0)


def test_zero_strength_is_identity_and_half_strength_is_halfway():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 64, generator=g)
    p = projection_matrix(torch.randn(2, 64, generator=g))
    assert torch.equal(project_out(x, [1, 2], p, strength=0.0), x)
    half = project_out(x, [1, 2], p, strength=0.5)
    full = project_out(x, [1, 2], p, strength=1.0)
    torch.testing.assert_close(half, (x + full) / 2, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="strength"):
        project_out(x, [1], p, strength=1.5)


def test_rank_deficient_and_empty_undesired_rows():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(2, 64, generator=g)
    rows = torch.cat([v, v * 3, v.sum(0, keepdim=True), torch.zeros(1, 64)])  # rank 2 of 5
    p = projection_matrix(rows)
    assert round(float(torch.trace(p))) == 2
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    assert torch.equal(projection_matrix(torch.zeros(3, 64)), torch.zeros(64, 64))
    assert torch.equal(projection_matrix(torch.zeros(0, 64)), torch.zeros(64, 64))


def test_batched_projection_matrices_match_one_by_one():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 4, 32, generator=g)
    ps = projection_matrix(rows)
    assert ps.shape == (3, 32, 32)
    for b in range(3):
        torch.testing.assert_close(ps[b], projection_matrix(rows[b]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("d", WIDTHS)
def test_replacement_touches_only_named_positions(d):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 20, d, generator=g)
    alone = torch.randn(20, d, generator=g)
    out = replace_rows(x, [6, 7], alone, [1, 2])
    assert torch.equal(out[0, 6], alone[1]) and torch.equal(out[0, 7], alone[2])
    keep = [i for i in range(20) if i not in (6, 7)]
    assert torch.equal(out[0, keep], x[0, keep])
    assert not torch.equal(x[0, 6], alone[1])  # input not modified in place
    with pytest.raises(ValueError, match="align"):
        replace_rows(x, [6, 7], alone, [1])
    with pytest.raises(ValueError, match="out of range"):
        replace_rows(x, [25], alone, [1])


def test_find_phrase_is_robust_to_case_and_punctuation(tokenizer):
    prompt = "a red circle and a blue square on a gray background"
    assert find_phrase(tokenizer, prompt, "blue square") == [[6, 7]]
    assert find_phrase(tokenizer, prompt, "Blue Square.") == [[6, 7]]
    assert find_phrase(tokenizer, "A red circle, and a Blue-square!", "blue square") == [[7, 8, 9]]
    assert find_phrase(tokenizer, "a red circle and a red square", "red") == [[2], [6]]
    n = len(tokenizer(prompt).input_ids)
    assert end_positions(tokenizer, prompt, 77) == list(range(n - 1, 77))


def test_phrase_not_in_prompt_names_the_phrase(tokenizer):
    with pytest.raises(ValueError, match="'green triangle'"):
        find_phrase(tokenizer, "a red circle and a blue square", "green triangle")
    with pytest.raises(ValueError, match="empty"):
        find_phrase(tokenizer, "a red circle", "  ")


def test_edited_positions_are_the_changed_words(tokenizer):
    src = "a red circle and a blue square on a gray background"
    tgt = "a green circle and a blue square on a gray background"
    assert edited_positions(tokenizer, tgt, src) == [2]


@pytest.mark.parametrize("d", WIDTHS)
def test_protect_embeddings_modes(tokenizer, d):
    ed = ToyEditor(tokenizer, width=d)
    prompt = "a red circle and a blue square on a gray background"
    emb = ed.encode_text([prompt])
    item, end = [6, 7], end_positions(tokenizer, prompt, 77)
    others = [i for i in range(77) if i not in item]
    assert protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="none") is emb

    rep = protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="replace")
    alone = ed.encode_text(["blue square"])[0]
    assert torch.equal(rep[0, item], alone[[1, 2]])
    assert torch.equal(rep[0, others], emb[0, others])

    rep_end = protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="replace",
                                 rows="item+end")
    assert torch.equal(rep_end[0, end[0]], alone[3])  # EOS row from the phrase alone
    assert torch.equal(rep_end[0, 1:6], emb[0, 1:6])

    proj = protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="project")
    bad = undesired_rows(emb, tokenizer, prompt, item)[0]
    assert (proj[0, item] @ bad.T).abs().max() < 1e-3 * emb.abs().max() * bad.norm(dim=-1).max()
    assert torch.equal(proj[0, others], emb[0, others])
    weak = protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="project", strength=0.0)
    assert torch.equal(weak, emb)

    both = protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="both",
                              rows="item+end")
    assert torch.equal(both[0, 1:6], emb[0, 1:6])
    assert not torch.equal(both[0, end], emb[0, end])


def test_protect_embeddings_errors(tokenizer):
    ed = ToyEditor(tokenizer)
    prompt = "a red circle and a blue square"
    emb = ed.encode_text([prompt])
    with pytest.raises(ValueError, match="'green square'"):
        protect_embeddings(ed, prompt, emb, protect=["green square"], mode="replace")
    with pytest.raises(ValueError, match="leakage mode"):
        protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="hide")
    with pytest.raises(ValueError, match="rows"):
        protect_embeddings(ed, prompt, emb, protect=["blue square"], mode="project", rows="all")


def test_bundled_model_protect_and_generate(editor):
    """On the real encoder: replace gives the phrase-alone rows; generate accepts protect."""
    prompt = "a red circle and a blue square on a gray background"
    emb = editor.model.encode_text([prompt])
    rep = protect_embeddings(editor.model, prompt, emb, protect=["Blue square"], mode="replace")
    alone = editor.model.encode_text(["blue square"])[0]
    torch.testing.assert_close(rep[0, 6:8], alone[1:3])
    assert torch.equal(rep[0, :6], emb[0, :6]) and torch.equal(rep[0, 8:], emb[0, 8:])
    img = editor.generate(prompt, GenerateOptions(seed=0, steps=2, protect=["blue square"],
                                                  leakage="both"))
    assert img.size == (editor.native_size, editor.native_size)
    with pytest.raises(ValueError, match="'green square'"):
        editor.generate(prompt, GenerateOptions(steps=1, protect=["green square"], leakage="replace"))
