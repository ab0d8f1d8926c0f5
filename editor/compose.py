"""Masks a person gives, and edits put back into the photo at its own size.

Pure image functions (numpy, torch, Pillow); no model.

- :func:`load_mask` reads a user mask (an image, a bool/float array or a path; any size)
  as a float array in [0, 1] at a given size, and refuses masks that cannot mean anything.
- :func:`feather` turns a binary mask at full resolution into a blending weight that is
  exactly 1 on the mask grown by ``grow`` pixels, exactly 0 beyond another ``2 * soft``
  pixels, and ramps linearly (a box blur) between.
- :func:`full_resolution` puts a model-size edit back into the original: the edit is
  upscaled with Lanczos and blended in with the feathered mask; every pixel outside the
  feathered mask is the original's pixel, exactly. Its memory follows the edited region
  (the mask's bounding box), not the photo.

The grow and feather widths (:func:`border_px`): one working-resolution pixel in
full-resolution pixels, ``ceil(scale)`` with ``scale`` the ratio of the original's size
to the working size (8 for a 4000 px photo edited at 512 px; at least 1). The mask's own
outline is only known to one working pixel, so growing it by one covers the edit's
outline, and the ramp hides the seam over one more.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Rows blended at a time (bounds the full-resolution float memory).
STRIP_ROWS = 256
MASK_MODES = ("user", "intersect", "union")


def load_mask(mask, size: tuple[int, int], *, what: str = "mask") -> np.ndarray:
    """``mask`` (PIL image, numpy bool/float/uint8 array, or a path) as ``h x w`` float32 in
    [0, 1] at ``size = (w, h)`` (resized bilinearly). An image counts its brightness (or its
    alpha channel when it has one: a brush stroke on a transparent layer). An empty mask is
    an error; a mask that covers everything is returned as it is (the caller says that no
    pixel will be kept)."""
    from .images import load_image  # same package layer; images reads files safely

    w, h = size
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder, not an image file")
        if not path.is_file():
            raise ValueError(f"{what} file not found: {str(path)!r}")
        try:
            with Image.open(path) as im:
                im.load()
                mask = im.copy()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the same message
            raise ValueError(f"{what} {str(path)!r} is not a readable image ({exc})") from None
        load_image(mask)  # the same pixel and aspect limits as any image
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            arr = np.asarray(mask.convert("RGBA"))[..., 3].astype(np.float32) / 255.0
        else:
            arr = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    elif isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[..., -1] if arr.shape[-1] == 4 else arr.mean(-1)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be a 2-D array (h x w), got shape {mask.shape}")
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.float32) / (255.0 if arr.max(initial=0) > 1 else 1.0)
        else:
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(f"{what} holds NaN or infinite values")
            arr = np.clip(arr, 0.0, 1.0)
    else:
        raise ValueError(f"{what} must be an image, a numpy array or a path, got "
                         f"{type(mask).__name__}")
    if arr.shape != (h, w):
        t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        arr = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    if not (arr > 0.5).any():
        raise ValueError(f"{what} is empty: mark the region the edit may change (white, or "
                         "painted strokes, on black)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def covers_everything(mask: np.ndarray) -> bool:
    return bool((mask > 0.5).all())


def border_px(original_size: tuple[int, int], working_size: tuple[int, int]) -> int:
    """The grow and feather width: one working pixel in original pixels (at least 1)."""
    scale = max(original_size[0] / working_size[0], original_size[1] / working_size[1])
    return max(1, math.ceil(scale - 1e-9))


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    """Square (Chebyshev) dilation by ``r`` pixels, separably (1 x h x w, 0/1 floats)."""
    if r <= 0:
        return m
    m = F.max_pool2d(m[None], (1, 2 * r + 1), stride=1, padding=(0, r))
    return F.max_pool2d(m, (2 * r + 1, 1), stride=1, padding=(r, 0))[0]


def _box_blur(m: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 box, zero outside the image, separably."""
    if r <= 0:
        return m
    k = 2 * r + 1
    m = F.avg_pool2d(m[None], (1, k), stride=1, padding=(0, r), count_include_pad=True)
    return F.avg_pool2d(m, (k, 1), stride=1, padding=(r, 0), count_include_pad=True)[0]


def feather(binary: np.ndarray, grow: int, soft: int) -> np.ndarray:
    """Blending weight from a binary mask (``h x w`` bool): 1 within ``grow`` pixels of the
    mask, 0 farther than ``grow + 2 * soft`` pixels (exactly), a linear ramp between."""
    m = torch.from_numpy(np.ascontiguousarray(binary, dtype=np.float32))[None]
    weight = _box_blur(_dilate(m, grow + soft), soft)[0]
    weight = torch.where(weight < 1e-6, torch.zeros_like(weight), weight.clamp(max=1.0))
    return weight.numpy()


def upscale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A working-size mask (``h x w`` in [0, 1]) as a binary mask at ``size = (W, H)``
    (bilinear, then > 0.5; 8-bit, so a 12 MP mask costs 12 MB)."""
    m = Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8), "L")
    return np.asarray(m.resize(size, Image.Resampling.BILINEAR)) > 127


def full_resolution(original: Image.Image, edit: Image.Image, mask: np.ndarray | None, *,
                    return_weight: bool = False) -> tuple[Image.Image, np.ndarray | None]:
    """``edit`` (working size) put back into ``original`` (RGB, upright, full size).

    With ``mask`` (working size, in [0, 1]): the edit is upscaled (Lanczos) and blended in
    with :func:`feather` (grow and soft widths :func:`border_px`); every pixel where the
    weight is 0 is the original's, byte for byte. Without a mask: the upscaled edit.
    The weight is only computed in the mask's bounding box grown by the border (plus a
    margin), and only that window of the edit is upscaled, so memory follows the edited
    region: a copy of the original (8-bit), the 8-bit mask, and float planes of the window.
    ``return_weight``: also return the full-size weight (``None`` otherwise).
    """
    W, H = original.size
    w, h = edit.size
    edit = edit.convert("RGB")
    icc = original.info.get("icc_profile")
    if mask is None:
        out = edit.resize((W, H), Image.Resampling.LANCZOS)
        if icc:
            out.info["icc_profile"] = icc
        return out, None
    px = border_px((W, H), (w, h))
    binary = upscale_mask(mask, (W, H))
    out = original.convert("RGB")
    out = out.copy() if out is original else out
    weight_full = np.zeros((H, W), np.float32) if return_weight else None
    rows, cols = np.nonzero(binary.any(axis=1))[0], np.nonzero(binary.any(axis=0))[0]
    if len(rows):
        reach = 3 * px + 4  # grow + ramp, and a margin for the window's own edges
        y0, y1 = max(0, rows[0] - reach), min(H, rows[-1] + 1 + reach)
        x0, x1 = max(0, cols[0] - reach), min(W, cols[-1] + 1 + reach)
        weight = feather(binary[y0:y1, x0:x1], px, px)
        box = (x0 * w / W, y0 * h / H, x1 * w / W, y1 * h / H)
        up = np.asarray(edit.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=box))
        a = np.asarray(out.crop((x0, y0, x1, y1)))
        mixed = a.copy()
        for s in range(0, y1 - y0, STRIP_ROWS):
            wgt = weight[s : s + STRIP_ROWS, :, None]
            if not wgt.any():
                continue
            sa = a[s : s + STRIP_ROWS].astype(np.float32)
            mix = np.clip(np.round(sa + wgt * (up[s : s + STRIP_ROWS].astype(np.float32) - sa)),
                          0, 255)
            mixed[s : s + STRIP_ROWS] = np.where(wgt > 0, mix, sa).astype(np.uint8)
        out.paste(Image.fromarray(mixed, "RGB"), (x0, y0))
        if weight_full is not None:
            weight_full[y0:y1, x0:x1] = weight
    if icc:
        out.info["icc_profile"] = icc
    return out, weight_full
