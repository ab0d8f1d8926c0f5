"""Files the engine and its faces write: atomically, with safe names.

Every output (images, inversions, JSON summaries) is written to a hidden temporary
file beside its destination, flushed to disk and renamed into place, so a run killed at
any moment (even ``kill -9``) leaves either the complete old file, the complete new one,
or a hidden ``.<name>.<pid>.tmp`` that nothing reads as an output.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def slugify(text: str, max_len: int = 60) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters (never empty)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = "-".join(words)[:max_len].strip("-")
    return slug or "edit"


def temporary_path(path: Path) -> Path:
    """The hidden temporary name :func:`atomic_write_bytes` uses for ``path`` (this process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a hidden temporary file beside ``path``, fsync, then rename."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def image_bytes(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def atomic_save_image(image: Image.Image, path: str | Path, **params) -> Path:
    """Save ``image`` atomically; the format follows the suffix (PNG by default)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    return atomic_write_bytes(path, image_bytes(image, fmt, **params))


def is_complete_image(path: Path) -> bool:
    """True for a readable image file (a leftover or damaged file is not 'done')."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure means "redo it"
        return False
