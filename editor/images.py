"""Reading user images: orientation, colour modes, sizing, hashing, tensors."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

#: The largest image read, in pixels (a 50 MP photo decodes to 150 MB of RGB). A larger JPEG
#: is decoded at a reduced scale (1/2, 1/4, 1/8, Pillow's ``draft``) to fit; any other larger
#: file is refused before it is decoded, so a small file that would decode to gigabytes (a
#: "decompression bomb") costs nothing.
MAX_IMAGE_PIXELS = 50_000_000
#: The most elongated image accepted (long side / short side).
MAX_ASPECT = 8.0


def _check_geometry(size: tuple[int, int], what: str, max_pixels: int, max_aspect: float) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"{what} has no pixels ({w} x {h})")
    if max(w, h) / min(w, h) > max_aspect:
        raise ValueError(f"{what} is {w} x {h} pixels, an aspect ratio of "
                         f"{max(w, h) / min(w, h):.1f}:1; pivot-edit takes images up to "
                         f"{max_aspect:g}:1 (crop it first)")
    if w * h > max_pixels:
        raise ValueError(f"{what} is {w} x {h} pixels ({w * h / 1e6:.1f} MP); pivot-edit reads "
                         f"images up to {max_pixels / 1e6:g} MP (resize it first)")


def _open(path: Path, max_pixels: int, max_aspect: float) -> Image.Image:
    """Open and decode ``path`` within the pixel and aspect limits (JPEGs reduced on load)."""
    name = f"image {str(path)!r}"
    try:
        with Image.open(path) as im:
            _check_geometry(im.size, name, 2**62, max_aspect)
            w, h = im.size
            if w * h > max_pixels and im.format == "JPEG":
                # the smallest power-of-two reduction that fits (JPEG decodes at 1/2, 1/4, 1/8)
                s = 2 ** math.ceil(math.log2(math.sqrt(w * h / max_pixels)))
                im.draft("RGB", (math.ceil(w / s), math.ceil(h / s)))
            _check_geometry(im.size, name, max_pixels, max_aspect)
            im.load()
            img = im.copy()
            img.info.update(im.info)
    except ValueError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError,
            EOFError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable image ({exc})") from None
    return img


def load_image(image: Image.Image | str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
               max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Open ``image`` (a path or a PIL image) as RGB, honouring EXIF orientation.

    RGBA / LA / palette-with-transparency are composited on white; greyscale and CMYK are
    converted; 16-bit images are scaled by their bit depth (never contrast-stretched).
    Raises ``ValueError`` for a path that is missing, a folder, or not an image, and for an
    image beyond :data:`MAX_IMAGE_PIXELS` or :data:`MAX_ASPECT` (the message names the limit).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not an image file")
        if not path.is_file():
            raise ValueError(f"image file not found: {str(path)!r}")
        img = _open(path, max_pixels, max_aspect)
    elif isinstance(image, Image.Image):
        _check_geometry(image.size, "the image", max_pixels, max_aspect)
        img = image
    else:
        raise ValueError(f"expected a PIL image or a path, got {type(image).__name__}")
    try:
        if img.getexif().get(0x0112, 1) != 1:  # no copy for an upright image
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop the edit
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)  # 16-bit samples (PNG "I" is 16-bit too)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr  # [0, 1] floats, else 0..255
        img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_size(width: int, height: int, *, multiple: int, max_pixels: int) -> tuple[int, int]:
    """The working size of a ``width x height`` image: both sides multiples of ``multiple``,
    at most ``max_pixels`` pixels (never below one ``multiple``), and the aspect ratio as
    close to the image's as those allow.

    Flooring both sides of the exact fit (the first candidate) can squash an image by up to
    one ``multiple`` per side (4000x3000 at 512x512 and multiple 64: 576x384, 3:2 for 4:3);
    so every width is tried with the tallest height that fits, and the candidate with the
    least aspect error wins among those with at least the floored size's pixels (ties: more
    pixels). The result is never smaller than the floored fit and never more distorted."""
    if width < 1 or height < 1:
        raise ValueError("image has no pixels")
    scale = math.sqrt(max_pixels / (width * height))
    w0 = max(multiple, int(width * scale) // multiple * multiple)
    h0 = max(multiple, int(height * scale) // multiple * multiple)
    target = math.log(width / height)

    def error(w: int, h: int) -> float:
        return abs(math.log(w / h) - target)

    best, floor_px = (w0, h0), w0 * h0
    for w in range(multiple, max(w0, max_pixels // multiple) + 1, multiple):
        h = max(multiple, max_pixels // w // multiple * multiple)
        if w * h > max_pixels or w * h < floor_px:
            continue
        if (error(w, h), -w * h) < (error(*best), -best[0] * best[1]):
            best = (w, h)
    return best


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
    rgb = img if img.mode == "RGB" else img.convert("RGB")
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
