"""The inversion cache that batch runs and comparisons share (``OUT/.cache``).

An inversion is keyed by the image's pixel hash, the prompt, the model's fingerprint and
the inversion options that change its values (:meth:`editor.options.InvertOptions.result_key`),
so equal settings spelled differently share an entry and different settings never do.
Entries are inversion files (safetensors + JSON, validated on load) written atomically:
concurrent writers of one key each rename a complete file into place, and a damaged or
foreign entry is ignored and redone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .images import image_hash
from .inversion import Inversion
from .options import InvertOptions

if TYPE_CHECKING:  # pragma: no cover
    from .facade import Editor

CACHE_DIR = ".cache"


def cache_key(image_digest: str, prompt: str, fingerprint: str,
              options: InvertOptions | Mapping[str, Any]) -> str:
    """Hash of everything that determines an inversion (and nothing else)."""
    if not isinstance(options, InvertOptions):
        options = InvertOptions.from_mapping(options)
    payload = json.dumps({"image": image_digest, "prompt": " ".join(prompt.split()),
                          "model": fingerprint, "options": options.result_key()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class InversionCache:
    """Inversion files in ``folder`` (``None``: a cache that never hits and stores nothing)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def key(self, editor: Editor, image: Image.Image, prompt: str, options: InvertOptions) -> str:
        return cache_key(image_hash(image), prompt, editor.fingerprint, options)

    def load(self, key: str, editor: Editor) -> Inversion | None:
        """The cached inversion, or ``None`` (absent, damaged, or made with other weights)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            inv = Inversion.load(path)
            inv.check_model(editor)
            return inv
        except ValueError:
            return None

    def store(self, key: str, inv: Inversion) -> None:
        path = self.path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            inv.save(path)

    def get(self, editor: Editor, image: Image.Image, prompt: str, options: InvertOptions,
            *, progress: bool = True) -> tuple[Inversion, bool]:
        """The cached inversion of ``image`` under ``prompt``, or a new one (then cached).
        Returns ``(inversion, came_from_cache)``."""
        key = self.key(editor, image, prompt, options)
        inv = self.load(key, editor)
        if inv is not None:
            return inv, True
        inv = editor.invert(image, prompt, options, progress=progress)
        self.store(key, inv)
        return inv, False

    def get_many(self, editor: Editor, cases: Sequence[tuple[str, Image.Image, str]],
                 options: InvertOptions, *, progress: bool = True
                 ) -> dict[str, Inversion | Exception]:
        """Inversions of ``(id, image, prompt)`` cases: cache first, then one batched run for
        the rest (each case alone if the batch is refused, so one bad case does not sink the
        others). A case that cannot be inverted maps to its exception."""
        out: dict[str, Inversion | Exception] = {}
        todo: list[tuple[str, Image.Image, str, str]] = []
        for cid, image, prompt in cases:
            key = self.key(editor, image, prompt, options)
            inv = self.load(key, editor)
            if inv is not None:
                out[cid] = inv
            else:
                todo.append((cid, image, prompt, key))
        if not todo:
            return out
        try:
            invs = editor.invert_batch([t[1] for t in todo], [t[2] for t in todo], options,
                                       progress=progress)
            for (cid, _, _, key), inv in zip(todo, invs, strict=True):
                out[cid] = inv
                self.store(key, inv)
        except Exception:  # noqa: BLE001 - retry one by one to isolate the culprit
            for cid, image, prompt, key in todo:
                try:
                    inv = editor.invert_batch([image], [prompt], options, progress=progress)[0]
                    out[cid] = inv
                    self.store(key, inv)
                except Exception as exc:  # noqa: BLE001 - recorded per case
                    out[cid] = exc
        return out
