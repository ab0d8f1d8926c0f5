"""The procedural scene generator and its checker (editor/scenes.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from editor import scenes

N = 120  # scenes per property check
CAPTION = re.compile(
    r"^a (red|green|blue|yellow) (circle|square|triangle)"
    r"( and a (red|green|blue|yellow) (circle|square|triangle))?"
    r" on a (white|gray|black) background$"
)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = scenes.sample(123), scenes.sample(123), scenes.sample(124)
    assert a.scene == b.scene and a.caption == b.caption
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert a.image.tobytes() != c.image.tobytes()


def test_captions_follow_the_grammar():
    seen_counts = set()
    for seed in range(N):
        s = scenes.sample(seed)
        m = CAPTION.match(s.caption)
        assert m, s.caption
        assert s.caption == s.scene.caption()
        n = 2 if m.group(3) else 1
        assert len(s.scene.objects) == len(s.masks) == n
        assert m.group(6) == s.scene.background
        for i, obj in enumerate(s.scene.objects):
            assert (obj.color, obj.shape) == m.group(1 + 3 * i, 2 + 3 * i)
        seen_counts.add(n)
    assert seen_counts == {1, 2}


def test_first_named_object_is_in_the_left_half_second_in_the_right():
    for seed in range(N):
        s = scenes.sample(seed, n_objects=2)
        half = s.scene.size / 2
        assert s.scene.objects[0].color != s.scene.objects[1].color  # distinct colours
        left, right = (np.nonzero(m > 0.5)[1] for m in s.masks)
        assert left.size and right.size
        assert left.max() < half <= right.min(), (seed, s.caption)


def test_masks_cover_the_objects_in_their_colour():
    for seed in range(N // 2):
        s = scenes.sample(seed)
        arr = np.asarray(s.image, dtype=np.float32)
        total = np.zeros(arr.shape[:2], np.float32)
        for obj, m in zip(s.scene.objects, s.masks, strict=True):
            assert m.shape == arr.shape[:2] and m.min() >= 0 and m.max() <= 1
            inside = m >= 1.0
            assert inside.sum() >= 20
            want = np.clip(np.array(scenes.COLORS[obj.color]) + np.array(obj.tint), 0, 255)
            assert np.abs(arr[inside] - want).max() <= 1.0
            total += m
        assert total.max() <= 1.0 + 1e-5  # occluded parts are not counted twice
        outside = total == 0  # background: achromatic (R = G = B)
        assert np.ptp(arr[outside], axis=1).max() == 0


def test_backgrounds_are_textured_near_their_named_level():
    for bg, level in scenes.BACKGROUNDS.items():
        s = scenes.sample(7, n_objects=1, background=bg)
        arr = np.asarray(s.image, dtype=np.float32)[..., 0][s.masks[0] < 0.01]
        assert 1.0 < arr.std() < 15.0
        assert abs(float(np.median(arr)) - level) < 20


def test_with_object_changes_only_that_object():
    s = scenes.sample(5, n_objects=2, colors=("red", "blue"), shapes=("circle", "square"))
    edited = s.scene.with_object(0, color="green")
    assert edited.caption() == "a green circle and a blue square on a " f"{s.scene.background} background"
    assert edited.objects[1] == s.scene.objects[1]
    assert edited.objects[0].center == s.scene.objects[0].center
    img, masks = edited.render()
    check = scenes.check_image(img, edited)
    assert check.color_ok and check.shape_ok


def test_sample_honours_requested_attributes():
    s = scenes.sample(1, n_objects=1, colors=("yellow",), shapes=("triangle",), background="black")
    assert s.caption == "a yellow triangle on a black background"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"n_objects": 3}, "one or two"), ({"n_objects": 1, "shapes": ("hexagon",)}, "unknown shape"),
     ({"n_objects": 1, "colors": ("purple",)}, "unknown color")],
)
def test_bad_requests_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        scenes.sample(0, **kwargs)


@pytest.mark.parametrize("n_objects", [1, 2])
def test_checker_recognises_every_ground_truth_render(n_objects):
    bad = []
    for seed in range(10_000, 10_000 + N):
        s = scenes.sample(seed, n_objects=n_objects)
        c = scenes.check_image(s.image, s.scene)
        if not (c.color_ok and c.shape_ok):
            bad.append((seed, s.caption, c))
    assert not bad


def test_checker_rejects_wrong_captions():
    """The same render judged against another colour / shape / side order must fail."""
    s = scenes.sample(3, n_objects=2, colors=("red", "blue"), shapes=("circle", "triangle"))
    swapped = scenes.Scene(s.scene.objects[::-1], s.scene.background)
    assert not scenes.check_image(s.image, swapped).color_ok
    assert not scenes.check_image(s.image, s.scene.with_object(0, color="yellow")).color_ok
    assert not scenes.check_image(s.image, s.scene.with_object(1, shape="square")).shape_ok


def test_blank_image_is_not_an_object():
    s = scenes.sample(2, n_objects=1)
    blank = scenes.Scene((), s.scene.background, texture_seed=s.scene.texture_seed).render()[0]
    c = scenes.check_image(blank, s.scene)
    assert c.colors == [None] and not c.color_ok and not c.shape_ok
