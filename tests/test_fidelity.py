"""Regression guard for the bundled model's fidelity (its model card's numbers).

Held-out prompts (scene seeds and noise seeds outside the training and evaluation
ranges of tools/train_shapes.py), 50 DDIM steps, guidance 7.5, judged by the
generator's ground-truth checker (editor.scenes.check_image). The default test
uses 12 prompts per object count; the slow one uses 64.

Measured on CPU (fp32) with the current model (v2), the first 12 prompts of each
set: single object color 12/12, shape 12/12; two objects both colors right and on
the right sides 10/12; 48 prompts: 100%, 98%, 85% (41/48). Model card, 256 prompts
on GPU: 100%, 98.8%, 79.3%. The assertions are the issue's targets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editor import scenes
from editor.images import psnr, to_tensor

STEPS, GUIDANCE = 50, 7.5
SEED = 7_000_000  # training used scene seeds < 10^5, its evaluation 5.0-5.3 million
# The target for two objects (both colours right, each on its named side).
TWO_OBJECT_TARGET = 0.70


def generate_set(editor, n_objects: int, count: int) -> list[scenes.Check]:
    """Generate ``count`` held-out prompts in one batch (one noise seed each) and check them."""
    start = SEED + n_objects * 100_000
    sc = [scenes.random_scene(np.random.default_rng(start + i), n_objects=n_objects)
          for i in range(count)]
    gens = [torch.Generator("cpu").manual_seed(start + i) for i in range(count)]
    size = editor.native_size
    with torch.no_grad():
        images = editor.pipe([s.caption() for s in sc], num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE, generator=gens, height=size,
                             width=size).images
    return [scenes.check_image(img, s) for img, s in zip(images, sc, strict=True)]


def rates(checks: list[scenes.Check]) -> tuple[float, float]:
    n = len(checks)
    return sum(c.color_ok for c in checks) / n, sum(c.shape_ok for c in checks) / n


def test_single_object_prompts(editor):
    color, shape = rates(generate_set(editor, 1, 12))
    assert color >= 0.90, f"color right {color:.0%}"
    assert shape >= 0.80, f"shape right {shape:.0%}"


@pytest.mark.slow
def test_two_object_prompts(editor):
    color, _ = rates(generate_set(editor, 2, 12))  # >= 70% of 12 means at least 9
    assert color >= TWO_OBJECT_TARGET, f"both colors on the right sides {color:.0%}"


@pytest.mark.slow
def test_fidelity_64_prompts(editor):
    color1, shape1 = rates(generate_set(editor, 1, 64))
    color2, _ = rates(generate_set(editor, 2, 64))
    assert color1 >= 0.90 and shape1 >= 0.80, (color1, shape1)
    assert color2 >= TWO_OBJECT_TARGET, color2


def test_vae_round_trip_psnr(editor):
    """Encode and decode 16 held-out generator scenes: the ceiling of every reconstruction."""
    ss = [scenes.sample(8_000_000 + i) for i in range(16)]
    x = torch.cat([to_tensor(s.image) for s in ss])
    rec = editor.model.decode_latents(editor.model.encode_image(x))
    values = [psnr(s.image, r) for s, r in zip(ss, rec, strict=True)]
    assert np.mean(values) >= 32.0, values
    assert min(values) >= 30.0, values
