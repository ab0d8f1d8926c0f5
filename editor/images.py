"""Reading user images: orientation, colour modes, sizing, hashing, tensors."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Open ``image`` (a path or a PIL image) as RGB, honouring EXIF orientation.

    RGBA / LA / palette-with-transparency are composited on white; greyscale,
    CMYK, 16-bit and float images are converted. Raises ``ValueError`` for a
    file that is missing or not an image.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file not found: {str(path)!r}")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
                img.info.update(im.info)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable image ({exc})") from None
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise ValueError(f"expected a PIL image or a path, got {type(image).__name__}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop the edit
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") and arr.max() > 255 else max(arr.max(), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def fit_size(width: int, height: int, *, multiple: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio, both sides multiples of ``multiple``,
    and at most ``max_pixels`` pixels (never below one ``multiple``)."""
    if width < 1 or height < 1:
        raise ValueError("image has no pixels")
    scale = math.sqrt(max_pixels / (width * height))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def prepare_image(
    image: Image.Image | str | Path, *, multiple: int, max_pixels: int
) -> tuple[Image.Image, str]:
    """Load, convert and resize ``image``; return it with a content hash of the input pixels."""
    img = load_image(image)
    digest = image_hash(img)
    size = fit_size(*img.size, multiple=multiple, max_pixels=max_pixels)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img, digest


def image_hash(img: Image.Image) -> str:
    """sha256 of the RGB pixels and size (independent of file format and metadata)."""
    rgb = img.convert("RGB")
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to a 1 x 3 x H x W float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two 8-bit images, optionally over ``mask`` (H x W, bool) only."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    err = (x - y) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        if not m.any():
            raise ValueError("mask selects no pixels")
        err = err[m]
    mse = float(err.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
