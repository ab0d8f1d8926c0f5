"""Batch edits from a manifest: invert each image once, apply all its edits, resume after a kill.

Manifests (JSON Lines, YAML or CSV) are read and validated by :mod:`editor.manifest`;
inversions are cached in ``OUT/.cache`` (:mod:`editor.cache`), keyed by the image's
pixel hash, prompt, model fingerprint and the inversion options that change the result.

Outputs: ``OUT/<id>/<n>-<slug of target>.png``, ``OUT/<id>/reconstruction.png`` and
``OUT/summary.json``. Every file is written to a temporary name and renamed into place
(:mod:`editor.fileio`), so a run killed at any moment (even ``kill -9``) leaves only
complete files or hidden ``.tmp`` files, and a rerun skips exactly the outputs that are
complete.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm.auto import tqdm

from .cache import CACHE_DIR, InversionCache, cache_key
from .fileio import atomic_save_image, atomic_write_bytes, is_complete_image, slugify
from .images import load_image
from .manifest import BatchItem, EditSpec, ManifestError, inversion_options, read_manifest

if TYPE_CHECKING:  # pragma: no cover
    from .facade import Editor
    from .inversion import Inversion

__all__ = ["run_batch", "run_item", "plan", "BatchReport", "ItemRecord", "read_manifest",
           "ManifestError", "BatchItem", "EditSpec", "cache_key", "is_complete_image",
           "slugify", "atomic_save_image", "atomic_write_bytes", "inversion_options"]

SUMMARY = "summary.json"
RECONSTRUCTION = "reconstruction.png"


def _result_image(result: Any) -> Image.Image:
    """The picture of an edit result (an ``EditResult`` or a bare PIL image)."""
    if isinstance(result, Image.Image):
        return result
    img = getattr(result, "image", None)
    if not isinstance(img, Image.Image):
        raise TypeError(f"edit returned {type(result).__name__} without an image")
    return img


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


@dataclass
class ItemRecord:
    """One line of ``summary.json``."""

    id: str
    image: str
    status: str  # "ok" | "failed"
    outputs: list[str]
    error: str | None
    seconds: float
    reconstruction: str | None = None
    inversion_cached: bool | None = None
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _LazyEditor:
    """Loads the model on first use, so a rerun with nothing left to do loads nothing."""

    def __init__(self, editor: Editor | Callable[[], Editor]):
        loaded = hasattr(editor, "invert")
        self._editor: Editor | None = editor if loaded else None  # type: ignore[assignment]
        self._factory = None if loaded else editor

    def get(self) -> Editor:
        if self._editor is None:
            self._editor = self._factory()  # type: ignore[misc]
        return self._editor


def _clean_temporaries(folder: Path) -> None:
    """Remove hidden temporaries a killed run may have left (never taken as outputs)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()


def _previous_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((out_dir / SUMMARY).read_text())
        return {r["id"]: r for r in data.get("items", []) if isinstance(r, dict) and "id" in r}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def write_summary(out_dir: Path, records: Iterable[ItemRecord], **extra: Any) -> None:
    data = {"items": [r.to_json() for r in records], **extra}
    atomic_write_bytes(out_dir / SUMMARY, (json.dumps(data, indent=1) + "\n").encode())


def _run_edits(
    editor: Editor, inv: Inversion, todo: list[tuple[int, EditSpec]], save: Callable[[int, Any], None],
    bar: Any,
) -> list[str]:
    """Apply the edits in ``todo``; edits with identical options share one ``edit_many`` run.
    A refused group is retried edit by edit so one bad target does not sink the others."""
    groups: dict[str, list[tuple[int, EditSpec]]] = {}
    for n, spec in todo:
        groups.setdefault(spec.resolved.group_key(), []).append((n, spec))
    errors: list[str] = []

    def single(n: int, spec: EditSpec) -> None:
        try:
            save(n, editor.edit(inv, spec.target, spec.resolved))
        except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
            errors.append(f"edit {n} ({spec.target!r}): {_error_text(exc)}")
        bar.update(1)

    for group in groups.values():
        if len(group) == 1:
            single(*group[0])
            continue
        try:
            results = editor.edit_many(inv, [s.target for _, s in group], group[0][1].resolved)
            for (n, _), res in zip(group, results, strict=True):
                save(n, res)
                bar.update(1)
        except Exception:  # noqa: BLE001 - isolate the culprit
            for n, spec in group:
                single(n, spec)
    return errors


def run_item(
    editor: _LazyEditor, item: BatchItem, out_dir: Path, *, defaults: dict[str, Any] | None,
    reconstruction: bool, use_cache: bool, edits_bar: Any,
) -> ItemRecord:
    """Invert ``item`` (or load it from the cache), reconstruct it and apply its edits."""
    t0 = time.perf_counter()
    folder = out_dir / item.id
    names = item.output_names()
    outputs = [f"{item.id}/{n}" for n in names]
    recon = f"{item.id}/{RECONSTRUCTION}" if reconstruction else None
    record = ItemRecord(item.id, str(item.image), "failed", outputs, None, 0.0, recon)
    todo = [(n, e) for n, (e, name) in enumerate(zip(item.edits, names, strict=True), 1)
            if not is_complete_image(folder / name)]
    need_recon = reconstruction and not is_complete_image(folder / RECONSTRUCTION)
    if not todo and not need_recon:
        record.status, record.resumed = "ok", True
        return record
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _clean_temporaries(folder)
        image = load_image(item.image)
        ed = editor.get()
        opts = inversion_options(item, defaults)
        cache = InversionCache(out_dir / CACHE_DIR if use_cache else None)
        inv, record.inversion_cached = cache.get(ed, image, item.prompt, opts)
        source: list[Image.Image] = []  # an edit's source branch re-creates the image

        def save(n: int, result: Any) -> None:
            atomic_save_image(_result_image(result), folder / names[n - 1])
            if isinstance(getattr(result, "source", None), Image.Image) and not source:
                source.append(result.source)

        errors = _run_edits(ed, inv, todo, save, edits_bar)
        if need_recon:
            recon = source[0] if source else ed.reconstruct(inv)
            atomic_save_image(recon, folder / RECONSTRUCTION)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch
        errors = [_error_text(exc)]
        edits_bar.update(len(todo))
    record.seconds = round(time.perf_counter() - t0, 3)
    record.error = "; ".join(errors) if errors else None
    record.status = "failed" if errors else "ok"
    return record


@dataclass
class BatchReport:
    records: list[ItemRecord]
    out_dir: Path

    @property
    def failed(self) -> list[ItemRecord]:
        return [r for r in self.records if r.status != "ok"]

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def run_batch(
    editor: Editor | Callable[[], Editor],
    items: list[BatchItem],
    out_dir: str | Path,
    *,
    defaults: dict[str, Any] | None = None,
    reconstruction: bool = True,
    use_cache: bool = True,
    progress: bool = True,
    manifest: str | None = None,
) -> BatchReport:
    """Run every item, rewriting ``OUT/summary.json`` after each; resumes where a killed run stopped.

    ``editor`` may be a loaded :class:`~editor.model.Editor` or a zero-argument factory
    (called only when some output is missing). Items already complete keep their
    previous record (marked ``resumed``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    _clean_temporaries(out / CACHE_DIR)
    previous = _previous_records(out)
    lazy = _LazyEditor(editor)
    records: list[ItemRecord] = []
    n_edits = sum(len(it.edits) for it in items)
    meta = {"manifest": manifest, "defaults": {k: v for k, v in (defaults or {}).items() if v is not None}}
    with tqdm(total=len(items), desc="items", unit="item", disable=not progress) as ibar, \
            tqdm(total=n_edits, desc="edits", unit="edit", disable=not progress, leave=False) as ebar:
        for item in items:
            ibar.set_postfix_str(item.id)
            done_before = sum(is_complete_image(out / o) for o in
                              (f"{item.id}/{n}" for n in item.output_names()))
            ebar.update(done_before)
            rec = run_item(lazy, item, out, defaults=defaults, reconstruction=reconstruction,
                           use_cache=use_cache, edits_bar=ebar)
            if rec.resumed and item.id in previous:
                rec.seconds = float(previous[item.id].get("seconds") or 0.0)
                rec.inversion_cached = previous[item.id].get("inversion_cached")
            records.append(rec)
            write_summary(out, records, finished=False, **meta)
            ibar.update(1)
    write_summary(out, records, finished=True, **meta)
    return BatchReport(records, out)


def plan(items: list[BatchItem], out_dir: str | Path, *, defaults: dict[str, Any] | None = None,
         reconstruction: bool = True) -> list[str]:
    """Human-readable plan of a run (what ``--dry-run`` prints); loads no model."""
    out = Path(out_dir)
    lines, todo = [], 0
    for it in items:
        state = "" if it.image.is_file() else "  [image not found: this item will fail]"
        lines.append(f"{it.id}: {it.image}{state}")
        lines.append(f"  prompt: {it.prompt}")
        inversion_options(it, defaults)  # validated: a bad combination fails the dry run
        given = {k: v for k, v in (defaults or {}).items() if v is not None} | it.inversion
        lines.append("  inversion: " + (", ".join(f"{k}={v}" for k, v in given.items()) or "defaults"))
        if reconstruction:
            done = is_complete_image(out / it.id / RECONSTRUCTION)
            lines.append(f"  0. (reconstruction) -> {out / it.id / RECONSTRUCTION}"
                         f" [{'done' if done else 'to do'}]")
        for n, (spec, name) in enumerate(zip(it.edits, it.output_names(), strict=True), 1):
            done = is_complete_image(out / it.id / name)
            todo += not done
            extra = f" {json.dumps(spec.options, sort_keys=True)}" if spec.options else ""
            lines.append(f"  {n}. {spec.target}{extra} -> {out / it.id / name}"
                         f" [{'done' if done else 'to do'}]")
    n_edits = sum(len(it.edits) for it in items)
    lines.append(f"{len(items)} item(s), {n_edits} edit(s), {todo} to do; outputs in {out}")
    return lines
