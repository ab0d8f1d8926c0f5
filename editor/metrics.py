"""Image-edit metrics: fidelity, background preservation, edit accuracy, leakage.

All functions take PIL images or ``H x W (x 3)`` uint8-range arrays and plain
boolean masks. Masked variants follow one of two conventions:

- ``"select"`` (default): the statistic is computed over the masked pixels only
  (for SSIM: over the windows whose centre lies in the mask).
- ``"zero"``: both images are multiplied by the mask and the statistic is taken
  over the whole image, as PIE-Bench's evaluation code does (Ju et al. 2023,
  ``evaluation/matrics_calculator.py``). The zeroed pixels agree exactly, so
  this inflates PSNR/SSIM and deflates MSE relative to ``"select"``; use it only
  to compare with published PIE-Bench numbers.

MSE is reported on intensities scaled to [0, 1] (as PIE-Bench does); PSNR uses
a peak of 255 (equivalently 1.0 on the [0, 1] scale).

LPIPS (Zhang et al. 2018) and CLIP score (Hessel et al. 2021) need network
weights. They are computed only when the weights are already on this machine
(the ``lpips`` package plus torchvision's cached backbone; a locally cached
``openai/clip-vit-large-patch14`` for CLIP); nothing is ever downloaded. When
unavailable they return ``None`` and :func:`optional_metrics_note` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import scenes
from .images import psnr as _psnr

ImageLike = Image.Image | np.ndarray
CLIP_MODEL = "openai/clip-vit-large-patch14"  # the model PIE-Bench's CLIP score uses


def _arr(img: ImageLike) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float64)


def _pair(a: ImageLike, b: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _arr(a), _arr(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    return x, y


def _mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    m = m > 0.5 if m.dtype != bool else m
    if m.shape != tuple(shape[:2]):
        raise ValueError(f"mask shape {m.shape} does not match the image {tuple(shape[:2])}")
    if not m.any():
        raise ValueError("mask selects no pixels")
    return m


def _check_convention(convention: str) -> None:
    if convention not in ("select", "zero"):
        raise ValueError(f"unknown mask convention {convention!r}; use 'select' or 'zero'")


def _zeroed(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return x * (m[..., None] if x.ndim == 3 else m)


# -- pixel statistics --------------------------------------------------------------------------


def mse(a: ImageLike, b: ImageLike, mask: np.ndarray | None = None, *, convention: str = "select") -> float:
    """Mean squared error on [0, 1] intensities, optionally over ``mask``."""
    _check_convention(convention)
    x, y = _pair(a, b)
    m = _mask(mask, x.shape)
    x, y = x / 255.0, y / 255.0
    if m is None:
        return float(((x - y) ** 2).mean())
    if convention == "zero":
        return float(((_zeroed(x, m) - _zeroed(y, m)) ** 2).mean())
    return float(((x - y) ** 2)[m].mean())


def psnr(a: ImageLike, b: ImageLike, mask: np.ndarray | None = None, *, convention: str = "select") -> float:
    """PSNR in dB (peak 255), optionally over ``mask``; ``inf`` for identical pixels."""
    _check_convention(convention)
    x, y = _pair(a, b)
    m = _mask(mask, x.shape)
    if m is not None and convention == "zero":
        return _psnr(_zeroed(x, m), _zeroed(y, m))
    return _psnr(x, y, m)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    k = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(k**2) / (2.0 * sigma**2))
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of an H x W x C array with the 1-D window ``w``."""
    n = len(w)
    h, wd = img.shape[:2]
    rows = sum(w[k] * img[k : h - n + 1 + k] for k in range(n))
    return sum(w[k] * rows[:, k : wd - n + 1 + k] for k in range(n))


def ssim_map(
    a: ImageLike, b: ImageLike, *, window: int = 11, sigma: float = 1.5,
    k1: float = 0.01, k2: float = 0.03, data_range: float = 255.0,
) -> np.ndarray:
    """Local SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window (sigma 1.5).

    Returns the map over the 'valid' window positions, averaged over colour
    channels: shape ``(H - window + 1) x (W - window + 1)``, as in the authors'
    reference implementation.
    """
    x, y = _pair(a, b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    if min(x.shape[:2]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {x.shape[:2]}")
    w = _gaussian_window(window, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
    sxx = _filter_valid(x * x, w) - mu_x**2
    syy = _filter_valid(y * y, w) - mu_y**2
    sxy = _filter_valid(x * y, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean(axis=-1)


def ssim(
    a: ImageLike, b: ImageLike, mask: np.ndarray | None = None, *, convention: str = "select",
    window: int = 11, sigma: float = 1.5,
) -> float:
    """Mean SSIM (Wang et al. 2004); with ``mask`` over the windows centred in it ("select")
    or over the whole image after zeroing outside the mask ("zero")."""
    _check_convention(convention)
    x, y = _pair(a, b)
    m = _mask(mask, x.shape)
    if m is not None and convention == "zero":
        return float(ssim_map(_zeroed(x, m), _zeroed(y, m), window=window, sigma=sigma).mean())
    smap = ssim_map(x, y, window=window, sigma=sigma)
    if m is None:
        return float(smap.mean())
    r = window // 2
    centres = m[r : r + smap.shape[0], r : r + smap.shape[1]]
    if not centres.any():
        raise ValueError("mask has no pixel far enough from the border for an SSIM window")
    return float(smap[centres].mean())


def region_metrics(
    a: ImageLike, b: ImageLike, mask: np.ndarray | None = None, *, convention: str = "select"
) -> dict[str, float]:
    """PSNR, SSIM and MSE of ``b`` against ``a`` over ``mask`` (whole image when None)."""
    return {
        "psnr": psnr(a, b, mask, convention=convention),
        "ssim": ssim(a, b, mask, convention=convention),
        "mse": mse(a, b, mask, convention=convention),
    }


def background_metrics(
    source: ImageLike, edited: ImageLike, edit_mask: np.ndarray, *, convention: str = "select"
) -> dict[str, float]:
    """Background preservation: PSNR/SSIM/MSE outside the edit mask (PIE-Bench's "unedit part")."""
    m = np.asarray(edit_mask)
    m = m > 0.5 if m.dtype != bool else m
    return region_metrics(source, edited, ~m, convention=convention)


# -- colour and shape on a region ------------------------------------------------------------------


def mean_hue(img: ImageLike, mask: np.ndarray, *, sat_min: float = 0.25) -> float | None:
    """Circular mean hue (degrees) of the saturated pixels under ``mask``; None if too few."""
    arr = _arr(img) / 255.0
    m = np.asarray(mask)
    m = m > 0.5 if m.dtype != bool else m
    mx, mn = arr.max(-1), arr.min(-1)
    delta = mx - mn
    sat = np.where(mx > 1e-6, delta / np.maximum(mx, 1e-6), 0.0)
    sel = m & (sat > sat_min) & (mx > 0.15)
    if sel.sum() < 4:
        return None
    r, g, b = arr[..., 0][sel], arr[..., 1][sel], arr[..., 2][sel]
    d = np.maximum(delta[sel], 1e-6)
    mxs = mx[sel]
    h = np.where(mxs == r, ((g - b) / d) % 6, np.where(mxs == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    ang = np.deg2rad(h)
    return float(np.rad2deg(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())) % 360)


def hue_shift(a: float | None, b: float | None) -> float | None:
    """Smallest angle (degrees) between two hues."""
    if a is None or b is None:
        return None
    d = abs(a - b) % 360
    return float(min(d, 360 - d))


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square (no SciPy needed)."""
    m = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    out = m.copy()
    h, w = m.shape
    p = np.pad(m, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def erode(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    m = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    return ~dilate(~m, radius)


@dataclass
class EditAccuracy:
    """What the edited image shows where the edited object should be."""

    color: str | None
    shape: str | None
    color_ok: bool
    shape_ok: bool

    @property
    def ok(self) -> bool:
        return self.color_ok and self.shape_ok


def edit_accuracy(
    edited: ImageLike,
    target: scenes.Scene,
    index: int,
    *,
    source: scenes.Scene | None = None,
) -> EditAccuracy:
    """Edit accuracy against a ShapesBench ground truth.

    ``target`` is the source scene redrawn with the edit (``Scene.with_object``).
    Colour: :func:`editor.scenes.classify_color` under the ground-truth mask of
    object ``index`` in ``target`` (eroded by one pixel to skip anti-aliased
    edges). Shape: :func:`editor.scenes.classify_shape` on the object as drawn in
    ``edited``: the saturated pixels within 45 degrees of the colour read there,
    taken as whole connected components (an object drawn larger than the truth is
    not clipped) that overlap the edit region (the object's source and target
    masks dilated by two pixels) more than the other objects' masks.
    """
    arr = np.asarray(edited.convert("RGB") if isinstance(edited, Image.Image) else edited)
    if arr.shape[:2] != (target.size, target.size):
        raise ValueError(f"edited image is {arr.shape[:2]}, the scene is {target.size}x{target.size}")
    _, t_masks = target.render()
    gt = t_masks[index] > 0.5
    region = gt.copy()
    others = np.zeros_like(gt)
    for j, m in enumerate(t_masks):
        if j != index:
            others |= m > 0.5
    if source is not None:
        _, s_masks = source.render()
        region |= s_masks[index] > 0.5
        for j, m in enumerate(s_masks):
            if j != index:
                others |= m > 0.5
    region = dilate(region, 2) & ~others
    core = erode(gt, 1)
    color = scenes.classify_color(arr, core if core.sum() >= 4 else gt)
    # the object: saturated pixels of the colour read above (so a rainbow fringe does not
    # widen its outline), whole connected components that lie mostly in the edit region
    obj = scenes.object_mask(arr)
    if color is not None:
        hue = scenes._hsv(arr, np.float64)[0]
        obj &= np.minimum(np.abs(hue - scenes.HUES[color]) % 360,
                          360 - np.abs(hue - scenes.HUES[color]) % 360) <= 45
    picked = np.zeros_like(obj)
    for comp in scenes._components(obj):
        if (comp & region).sum() > (comp & others).sum():
            picked |= comp
    shape = scenes.classify_shape(picked)
    want = target.objects[index]
    return EditAccuracy(color, shape, color == want.color, shape == want.shape)


@dataclass
class ProtectedChange:
    """How much an object that the edit should leave alone changed."""

    psnr: float  # on the object's mask, edited vs source
    hue_shift: float | None  # degrees between the object's mean hues
    color: str | None  # colour read from the edited image on that mask
    color_kept: bool


def protected_change(
    source: ImageLike, edited: ImageLike, mask: np.ndarray, *, expected_color: str | None = None
) -> ProtectedChange:
    """PSNR on the protected object's mask plus its hue shift (leakage measure)."""
    m = np.asarray(mask)
    m = m > 0.5 if m.dtype != bool else m
    core = erode(m, 1)
    core = core if core.sum() >= 4 else m
    src, out = _arr(source).astype(np.uint8), _arr(edited).astype(np.uint8)
    want = expected_color or scenes.classify_color(src, core)
    got = scenes.classify_color(out, core)
    return ProtectedChange(
        psnr=psnr(src, out, m),
        hue_shift=hue_shift(mean_hue(src, core), mean_hue(out, core)),
        color=got,
        color_kept=got is not None and got == want,
    )


# -- learned metrics, only with local weights ------------------------------------------------------


def _torch_hub_has(prefix: str) -> bool:
    try:
        import torch

        d = Path(torch.hub.get_dir()) / "checkpoints"
        return d.is_dir() and any(p.name.startswith(prefix) for p in d.iterdir())
    except Exception:  # noqa: BLE001
        return False


@lru_cache(maxsize=1)
def _lpips_model() -> tuple[Any, str | None]:
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None, "LPIPS not computed: the 'lpips' package is not installed (pip install lpips)"
    if not _torch_hub_has("alexnet"):
        return None, ("LPIPS not computed: torchvision's AlexNet weights are not in the torch hub "
                      "cache and pivot-edit never downloads weights")
    try:
        return lpips.LPIPS(net="alex", verbose=False).eval(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"LPIPS not computed: could not load its weights ({type(exc).__name__})"


@lru_cache(maxsize=1)
def _clip_model() -> tuple[Any, str | None]:
    note = (f"CLIP score not computed: {CLIP_MODEL} is not in the local Hugging Face cache "
            "and pivot-edit never downloads weights")
    try:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(CLIP_MODEL, "config.json"), str):
            return None, note
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(CLIP_MODEL, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(CLIP_MODEL, local_files_only=True)
        return (model, proc), None
    except Exception:  # noqa: BLE001 - not cached (or not loadable): no score
        return None, note


def lpips_distance(a: ImageLike, b: ImageLike, mask: np.ndarray | None = None) -> float | None:
    """LPIPS (AlexNet) distance; masked by zeroing as PIE-Bench does. None without local weights."""
    model, _ = _lpips_model()
    if model is None:
        return None
    import torch

    x, y = _pair(a, b)
    m = _mask(mask, x.shape)
    if m is not None:
        x, y = _zeroed(x, m), _zeroed(y, m)
    tx = torch.from_numpy(x / 127.5 - 1).permute(2, 0, 1)[None].float()
    ty = torch.from_numpy(y / 127.5 - 1).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return float(model(tx, ty).item())


def clip_score(img: ImageLike, text: str, mask: np.ndarray | None = None) -> float | None:
    """CLIP score 100 * max(cos(image, text), 0) (torchmetrics' definition, used by PIE-Bench).
    None without local weights."""
    loaded, _ = _clip_model()
    if loaded is None:
        return None
    import torch

    model, proc = loaded
    x = _arr(img)
    m = _mask(mask, x.shape)
    if m is not None:
        x = _zeroed(x, m)
    inputs = proc(text=[text], images=[Image.fromarray(x.astype(np.uint8))], return_tensors="pt",
                  padding=True, truncation=True)
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=inputs["pixel_values"])
        te = model.get_text_features(input_ids=inputs["input_ids"],
                                     attention_mask=inputs["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ie, te).item()
    return float(100.0 * max(cos, 0.0))


def optional_metrics_note() -> list[str]:
    """One line per learned metric that cannot be computed here (empty when all can)."""
    notes = []
    for loader in (_lpips_model, _clip_model):
        _, note = loader()
        if note:
            notes.append(note)
    return notes


def finite_mean(values: list[float | None]) -> float | None:
    """Mean of the finite values (Nones and the inf PSNRs of identical images are skipped);
    ``inf`` when every value is inf, None when there is none."""
    given = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    vals = [v for v in given if math.isfinite(v)]
    if vals:
        return float(np.mean(vals))
    return math.inf if given else None
