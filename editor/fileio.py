"""Files the engine and its faces write: atomically, with safe names.

Every output (images, inversions, JSON summaries) is written to a hidden temporary
file beside its destination, flushed to disk and renamed into place, so a run killed at
any moment (even ``kill -9``) leaves either the complete old file, the complete new one,
or a hidden ``.<name>.<pid>.tmp`` that nothing reads as an output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import time
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: The lock file a run keeps in its output folder (``OutputLock``).
LOCK_NAME = ".pivot-edit.lock"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_RE = re.compile(r"^\..+\.((?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)\.tmp$")  # host: older runs
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, carriage returns,
    bidirectional overrides) shown as ``\\xNN`` / ``\\uNNNN`` instead of acting on it."""
    def esc(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _CONTROL.sub(esc, str(text))


def slugify(text: str, max_len: int = 60) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters (never empty)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = "-".join(words)[:max_len].strip("-")
    return slug or "edit"


def temporary_path(path: Path) -> Path:
    """The hidden temporary name :func:`atomic_write_bytes` uses for ``path``: it names this
    host and process, so a cleanup can tell a live writer's file from a dead one's."""
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_temporaries(folder: Path, *, older_than_s: float = 3600.0) -> list[Path]:
    """Remove the hidden temporaries of writers that are gone: this host's whose process is
    dead, other hosts' (a cluster's shared folder) only when older than ``older_than_s``.
    A live writer's temporary is never touched. Returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or not p.is_file():
            continue
        if m["host"] in (_HOST, None):
            dead = not _alive(int(m["pid"]))
        else:
            with contextlib.suppress(OSError):
                dead = now - p.stat().st_mtime > older_than_s
        if dead:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


class OutputLock:
    """An exclusive lock on an output folder, held for a run (``with OutputLock(out): ...``).

    The lock is ``OUT/.pivot-edit.lock``, locked with ``flock`` (released by the kernel when
    the process ends, even on ``kill -9``) and holding the owner's pid, host and start time
    for the message a second run gets. Where ``flock`` is unavailable the pid decides: a
    lock whose process is dead is stale and taken over.
    """

    def __init__(self, folder: str | Path, what: str = "pivot-edit run") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return (f"pid {int(info['pid'])} on {info.get('host', '?')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info['started'])))}")
        except (OSError, ValueError, KeyError, TypeError):
            return "owner unknown"

    def _refuse(self) -> ValueError:
        return ValueError(
            f"another {self.what} is writing to {str(self.folder)!r} ({self._owner()}); two runs "
            "on one output folder would overwrite each other's summary: wait for it to finish, "
            "or use another --out")

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform: pid check
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
        else:  # pragma: no cover
            try:
                pid = int(json.loads(self.path.read_text() or "{}").get("pid", 0))
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                os.close(fd)
                raise self._refuse()
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.write(fd, info)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_folder(folder: str | Path, what: str = "--out") -> Path:
    """Create ``folder`` if needed; ``ValueError`` (one line) when it is a file, cannot be
    created or is not writable."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {str(out)!r} cannot be created ({exc.strerror or exc})") from None
    probe = out / f".write-test.{_HOST}-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{what} {str(out)!r} is not writable ({exc.strerror or exc})") from None
    return out


def check_output_file(path: str | Path, suffixes: tuple[str, ...], what: str = "output") -> Path:
    """An output file path that can be written: a known suffix, an existing parent folder,
    not a folder itself. Checked before any work is done."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{what} {str(out)!r} is a folder; give a file name ending in "
                         f"{' or '.join(suffixes)}")
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(out)!r} must end in {', '.join(suffixes)}")
    if not out.parent.is_dir():
        raise ValueError(f"{what} folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{what} folder {str(out.parent)!r} is not writable")
    return out


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
    """Save ``image`` atomically; the format follows the suffix (PNG by default). The
    image's ICC profile (``image.info["icc_profile"]``, kept from the original photo) is
    written with it; JPEG and WebP at quality 95. No EXIF is written: images are upright."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    icc = image.info.get("icc_profile")
    if icc and "icc_profile" not in params:
        params["icc_profile"] = icc
    if fmt in ("JPEG", "WEBP"):
        params.setdefault("quality", 95)
        image = image.convert("RGB")
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
