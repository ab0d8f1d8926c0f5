"""Metrics: PSNR/MSE/SSIM (plain and masked), edit accuracy, protected-object change."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from editor import metrics, scenes


def _noisy(arr: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(arr + rng.normal(0, sigma, arr.shape), 0, 255).astype(np.uint8)


def _ssim_bruteforce(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Eq. 13 of Wang et al. 2004 evaluated window by window (slow, independent of the code)."""
    k = np.arange(win) - (win - 1) / 2
    g = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - win + 1):
            for j in range(x.shape[1] - win + 1):
                a = x[i : i + win, j : j + win, c].astype(float)
                b = y[i : i + win, j : j + win, c].astype(float)
                ma, mb = (g * a).sum(), (g * b).sum()
                va, vb = (g * (a - ma) ** 2).sum(), (g * (b - mb) ** 2).sum()
                cov = (g * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_windowed_definition():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 17, 3)).astype(np.uint8)
    y = _noisy(x, 30.0)
    assert metrics.ssim(x, y) == pytest.approx(_ssim_bruteforce(x, y), abs=1e-9)


def test_ssim_properties():
    img = np.asarray(scenes.sample(3).image)
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    a, b = _noisy(img, 5), _noisy(img, 25, seed=1)
    assert 1.0 > metrics.ssim(img, a) > metrics.ssim(img, b) > 0.0
    assert metrics.ssim(img, b) == pytest.approx(metrics.ssim(b, img))
    # constant images: variances vanish, SSIM is the luminance term alone
    x = np.full((16, 16, 3), 100, np.uint8)
    y = np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(x, y) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_psnr_mse_consistent_and_masked():
    img = np.asarray(scenes.sample(4).image)
    out = img.copy()
    out[:, :32] = 255 - out[:, :32]  # damage the left half only
    right = np.zeros(img.shape[:2], bool)
    right[:, 32:] = True
    assert metrics.psnr(img, out, right) == math.inf
    assert metrics.mse(img, out, right) == 0.0
    assert metrics.ssim(img, out, right) < 1.0  # windows near the seam see the damage
    left = ~right
    m = metrics.mse(img, out, left)
    assert metrics.psnr(img, out, left) == pytest.approx(10 * math.log10(1.0 / m))
    # PIE-Bench's convention zeroes the unselected pixels and averages over the whole image
    assert metrics.mse(img, out, left, convention="zero") == pytest.approx(m / 2)
    bg = metrics.background_metrics(img, out, edit_mask=left)
    assert bg["psnr"] == math.inf and bg["mse"] == 0.0
    with pytest.raises(ValueError, match="selects no pixels"):
        metrics.psnr(img, out, np.zeros(img.shape[:2], bool))
    with pytest.raises(ValueError, match="differ in size"):
        metrics.mse(img, img[:10])
    with pytest.raises(ValueError, match="convention"):
        metrics.mse(img, out, left, convention="nope")


def test_edit_accuracy_against_ground_truth():
    s = scenes.sample(11, n_objects=1, colors=("red",), shapes=("circle",), background="white")
    want = s.scene.with_object(0, color="blue", shape="square")
    gt_img, _ = want.render()
    acc = metrics.edit_accuracy(gt_img, want, 0, source=s.scene)
    assert acc.ok and acc.color == "blue" and acc.shape == "square"
    # the unedited source fails both
    acc = metrics.edit_accuracy(s.image, want, 0, source=s.scene)
    assert not acc.color_ok and not acc.shape_ok and acc.color == "red"
    # colour right, shape wrong
    half = s.scene.with_object(0, color="blue")
    acc = metrics.edit_accuracy(half.render()[0], want, 0, source=s.scene)
    assert acc.color_ok and not acc.shape_ok



def test_edit_accuracy_reads_the_whole_object():
    """An edited object drawn larger than the truth is not clipped to the truth's region
    (clipped, this square reads as a circle), and a saturated fringe of another hue
    does not widen its outline."""
    s = scenes.sample(13, n_objects=1, colors=("red",), shapes=("circle",), background="white")
    want = s.scene.with_object(0, color="blue", shape="square")
    big = want.with_object(0, radius=want.objects[0].radius * 1.35)
    arr = np.asarray(big.render()[0]).copy()
    assert metrics.edit_accuracy(arr, want, 0, source=s.scene).ok
    ys, xs = np.nonzero(big.render()[1][0] > 0.5)
    arr[ys.min() : ys.max(), xs.max() + 1 : xs.max() + 4] = (230, 40, 200)  # magenta fringe
    acc = metrics.edit_accuracy(arr, want, 0, source=s.scene)
    assert acc.ok, acc


def test_protected_change_detects_leakage():
    s = scenes.sample(5, n_objects=2, colors=("red", "green"), shapes=("circle", "square"))
    edited = s.scene.with_object(1, color="blue")  # the right object is edited
    leaked = edited.with_object(0, color="yellow")  # ... and the left one changed too
    clean = metrics.protected_change(s.image, edited.render()[0], s.masks[0])
    bad = metrics.protected_change(s.image, leaked.render()[0], s.masks[0])
    assert clean.psnr == math.inf and clean.hue_shift == pytest.approx(0, abs=1e-6) and clean.color_kept
    assert bad.psnr < 20 and bad.hue_shift > 30 and not bad.color_kept and bad.color == "yellow"


def test_mean_hue_and_morphology():
    img = np.zeros((8, 8, 3), np.uint8)
    img[...] = (40, 80, 225)
    assert metrics.mean_hue(img, np.ones((8, 8), bool)) == pytest.approx(226.7, abs=1)
    assert metrics.hue_shift(350.0, 10.0) == pytest.approx(20.0)
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    assert metrics.dilate(m, 1).sum() == 9 and metrics.erode(metrics.dilate(m, 1), 1).sum() == 1


def test_optional_learned_metrics_report_instead_of_downloading():
    notes = metrics.optional_metrics_note()
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    lp = metrics.lpips_distance(img, img)
    cs = metrics.clip_score(img, "a photo")
    # either computed from local weights or None with an explanation
    assert (lp is None) == any(n.startswith("LPIPS") for n in notes)
    assert (cs is None) == any(n.startswith("CLIP") for n in notes)
    assert metrics.finite_mean([1.0, math.inf, None, 3.0]) == 2.0
    assert metrics.finite_mean([math.inf, None]) == math.inf
    assert metrics.finite_mean([None]) is None
