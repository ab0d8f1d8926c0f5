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

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm.auto import tqdm

from .cache import CACHE_DIR, InversionCache, cache_key
from .fileio import (
    OutputLock,
    atomic_save_image,
    atomic_write_bytes,
    check_output_folder,
    clean_temporaries,
    is_complete_image,
    printable,
    slugify,
)
from .images import load_image
from .manifest import BatchItem, EditSpec, ManifestError, inversion_options, read_manifest

if TYPE_CHECKING:  # pragma: no cover
    from .facade import Editor
    from .inversion import Inversion

__all__ = ["run_batch", "run_item", "plan", "BatchReport", "BatchRun", "ItemRecord",
           "item_done", "resumed_record", "failed_record", "read_manifest",
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
    """One item of ``summary.json``: ``outputs`` lists only files that exist and are
    complete; ``edits`` holds every edit's own status (``ok`` / ``failed`` / ``not run``),
    its output (``None`` unless written) and its error."""

    id: str
    image: str
    status: str  # "ok" | "failed"
    outputs: list[str]
    error: str | None
    seconds: float
    reconstruction: str | None = None
    inversion_cached: bool | None = None
    resumed: bool = False
    edits: list[dict[str, Any]] = field(default_factory=list)
    reconstruction_psnr: float | None = None
    warning: str | None = None
    full_resolution: bool | None = None

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
    editor: Editor, inv: Inversion, item: BatchItem, todo: list[tuple[int, EditSpec]],
    save: Callable[[int, Any], None], bar: Any, original: Image.Image | None,
) -> dict[int, str]:
    """Apply the edits in ``todo``; edits with identical options and mask share one
    ``edit_many`` run. A refused group is retried edit by edit so one bad target does not
    sink the others. Returns the error of each edit that failed, by edit number."""
    groups: dict[str, list[tuple[int, EditSpec]]] = {}
    for n, spec in todo:
        key = json.dumps([spec.resolved.group_key(), str(item.mask_of(spec))])
        groups.setdefault(key, []).append((n, spec))
    errors: dict[int, str] = {}

    def single(n: int, spec: EditSpec) -> None:
        try:
            save(n, editor.edit(inv, spec.target, spec.resolved, mask=item.mask_of(spec),
                                original=original))
        except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
            errors[n] = _error_text(exc)
        bar.update(1)

    for group in groups.values():
        if len(group) == 1:
            single(*group[0])
            continue
        try:
            first = group[0][1]
            results = editor.edit_many(inv, [s.target for _, s in group], first.resolved,
                                       mask=item.mask_of(first), original=original)
            for (n, _), res in zip(group, results, strict=True):
                save(n, res)
                bar.update(1)
        except Exception:  # noqa: BLE001 - isolate the culprit
            for n, spec in group:
                single(n, spec)
    return errors


def run_item(
    editor: _LazyEditor, item: BatchItem, out_dir: Path, *, defaults: dict[str, Any] | None,
    reconstruction: bool, use_cache: bool, edits_bar: Any, native: bool = False,
    min_reconstruction_psnr: float | None = None,
) -> ItemRecord:
    """Invert ``item`` (or load it from the cache), reconstruct it and apply its edits.

    Edits of an image larger than the working size are written at its own size (the
    original's pixels outside each edit's mask) unless ``native``. An inversion whose
    reconstruction PSNR is below ``min_reconstruction_psnr`` fails the item unedited."""
    t0 = time.perf_counter()
    folder = out_dir / item.id
    names = item.output_names()
    record = _new_record(item, reconstruction)
    todo, need_recon = _missing(item, out_dir, reconstruction)
    errors: dict[int, str] = {}
    item_error: str | None = None
    ticked = [0]

    class _Bar:  # counts what this item added to the shared edits bar
        def update(self, n: int = 1) -> None:
            ticked[0] += n
            edits_bar.update(n)

    if not todo and not need_recon:
        return resumed_record(item, out_dir, reconstruction=reconstruction)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_temporaries(folder)
        image = load_image(item.image)
        ed = editor.get()
        opts = inversion_options(item, defaults)
        cache = InversionCache(out_dir / CACHE_DIR if use_cache else None)
        inv, record.inversion_cached = cache.get(ed, image, item.prompt, opts)
        record.reconstruction_psnr = inv.stats.get("reconstruction_psnr")
        record.warning = inv.stats.get("warning")
        w, h = inv.image_size
        big = image.size[0] * image.size[1] > w * h
        record.full_resolution = big and not native
        original = image if record.full_resolution else None
        source: list[Image.Image] = []  # an edit's source branch re-creates the image
        low = (min_reconstruction_psnr is not None and record.reconstruction_psnr is not None
               and record.reconstruction_psnr < min_reconstruction_psnr)
        if low:
            edits_bar.update(len(todo))
            todo = []
            item_error = (f"reconstruction {record.reconstruction_psnr:.1f} dB is below "
                          f"--min-reconstruction-psnr {min_reconstruction_psnr:g}: not edited")

        def save(n: int, result: Any) -> None:
            atomic_save_image(_result_image(result), folder / names[n - 1])
            if isinstance(getattr(result, "source", None), Image.Image) and not source:
                source.append(result.source)

        errors = _run_edits(ed, inv, item, todo, save, _Bar(), original)
        if need_recon:
            recon = source[0] if source else ed.reconstruct(inv)
            atomic_save_image(recon, folder / RECONSTRUCTION)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch
        item_error = _error_text(exc)
        edits_bar.update(len(todo) - ticked[0])
    record.seconds = round(time.perf_counter() - t0, 3)
    _finish(record, item, folder, errors, item_error)
    return record


def _new_record(item: BatchItem, reconstruction: bool) -> ItemRecord:
    recon = f"{item.id}/{RECONSTRUCTION}" if reconstruction else None
    return ItemRecord(item.id, str(item.image), "failed", [], None, 0.0, recon)


def _missing(item: BatchItem, out_dir: Path, reconstruction: bool
             ) -> tuple[list[tuple[int, EditSpec]], bool]:
    """The edits whose output is not a complete image yet, and whether the reconstruction
    still has to be written."""
    folder = out_dir / item.id
    todo = [(n, e) for n, (e, name) in enumerate(zip(item.edits, item.output_names(), strict=True), 1)
            if not is_complete_image(folder / name)]
    return todo, reconstruction and not is_complete_image(folder / RECONSTRUCTION)


def item_done(item: BatchItem, out_dir: Path, *, reconstruction: bool) -> bool:
    """Every output of ``item`` is on disk and complete (a rerun has nothing to do)."""
    todo, need_recon = _missing(item, out_dir, reconstruction)
    return not todo and not need_recon


def resumed_record(item: BatchItem, out_dir: Path, *, reconstruction: bool) -> ItemRecord:
    """The record of an item whose outputs are all there already (nothing run)."""
    record = _new_record(item, reconstruction)
    record.status, record.resumed = "ok", True
    _finish(record, item, out_dir / item.id, {}, None)
    return record


def failed_record(item: BatchItem, out_dir: Path, *, reconstruction: bool, error: str,
                  seconds: float = 0.0) -> ItemRecord:
    """The record of an item that could not be run to its end (``error`` says why), with
    whatever outputs it left complete on disk."""
    record = _new_record(item, reconstruction)
    record.seconds = round(seconds, 3)
    _finish(record, item, out_dir / item.id, {}, error)
    return record


def _finish(record: ItemRecord, item: BatchItem, folder: Path, errors: dict[int, str],
            item_error: str | None) -> None:
    """Fill the record from what is on disk: outputs that exist and are complete, and each
    edit's status (an item-level failure marks the edits it kept from running)."""
    record.outputs, record.edits = [], []
    for n, (spec, name) in enumerate(zip(item.edits, item.output_names(), strict=True), 1):
        done = is_complete_image(folder / name)
        rel = f"{item.id}/{name}" if done else None
        if done:
            record.outputs.append(rel)
        status = "ok" if done else "failed" if n in errors else "not run"
        error = errors.get(n) or (None if done else item_error)
        record.edits.append({"n": n, "target": spec.target, "output": rel, "status": status,
                             "error": error})
    if record.reconstruction and not is_complete_image(folder / RECONSTRUCTION):
        record.reconstruction = None
    messages = ([item_error] if item_error else []) + [
        f"edit {n} ({item.edits[n - 1].target!r}): {e}" for n, e in sorted(errors.items())]
    record.error = "; ".join(messages) if messages else None
    record.status = "ok" if all(e["status"] == "ok" for e in record.edits) and not messages else "failed"


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
    native: bool = False,
    min_reconstruction_psnr: float | None = None,
) -> BatchReport:
    """Run every item, rewriting ``OUT/summary.json`` after each; resumes where a killed run stopped.

    ``editor`` may be a loaded :class:`~editor.model.Editor` or a zero-argument factory
    (called only when some output is missing). Items already complete keep their
    previous record (marked ``resumed``).
    """
    out = check_output_folder(out_dir)
    with OutputLock(out, "pivot-edit batch run"):
        return _run_locked(editor, items, out, defaults=defaults, reconstruction=reconstruction,
                           use_cache=use_cache, progress=progress, manifest=manifest,
                           native=native, min_reconstruction_psnr=min_reconstruction_psnr)


class BatchRun:
    """The record-keeping both engines share (the local loop here, the Ray driver in
    :mod:`editor.ray_engine`): records in manifest order whatever order they arrive in,
    ``summary.json`` rewritten atomically after each, a resumed item's earlier seconds
    kept, and per-worker throughput. Used inside the output folder's lock."""

    def __init__(self, items: list[BatchItem], out: Path, *, defaults: dict[str, Any] | None,
                 manifest: str | None, engine: str) -> None:
        self.items, self.out, self.engine = items, out, engine
        clean_temporaries(out)
        clean_temporaries(out / CACHE_DIR)
        self.previous = _previous_records(out)
        self.records: dict[str, ItemRecord] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.meta = {"manifest": manifest,
                     "defaults": {k: v for k, v in (defaults or {}).items() if v is not None}}
        self.t0 = time.perf_counter()

    def add(self, rec: ItemRecord, *, worker: str | None = None, seconds: float | None = None,
            worker_info: dict[str, Any] | None = None) -> None:
        """Keep ``rec`` (done by ``worker`` in ``seconds``) and rewrite the summary."""
        if rec.resumed and rec.id in self.previous:
            rec.seconds = float(self.previous[rec.id].get("seconds") or 0.0)
            rec.inversion_cached = self.previous[rec.id].get("inversion_cached")
        self.records[rec.id] = rec
        if worker is not None:
            w = self.workers.setdefault(worker, {"worker": worker, "items": 0, "seconds": 0.0,
                                                 **(worker_info or {})})
            w["items"] += 1
            w["seconds"] = round(w["seconds"] + (rec.seconds if seconds is None else seconds), 3)
            w["items_per_s"] = round(w["items"] / w["seconds"], 4) if w["seconds"] > 0 else None
        self.write(finished=False)

    def ordered(self) -> list[ItemRecord]:
        return [self.records[it.id] for it in self.items if it.id in self.records]

    def stats(self) -> dict[str, Any]:
        """The run's engine and throughput: items run (not resumed) per second of wall time,
        and each worker's items, busy seconds and items per busy second."""
        wall = time.perf_counter() - self.t0
        ran = sum(w["items"] for w in self.workers.values())
        return {"engine": self.engine, "wall_seconds": round(wall, 3),
                "items_per_s": round(ran / wall, 4) if wall > 0 and ran else None,
                "workers": list(self.workers.values())}

    def write(self, *, finished: bool, **extra: Any) -> None:
        write_summary(self.out, self.ordered(), finished=finished, **self.meta, **self.stats(),
                      **extra)

    def finish(self, **extra: Any) -> BatchReport:
        self.write(finished=True, **extra)
        return BatchReport(self.ordered(), self.out)


def _run_locked(editor, items, out: Path, *, defaults, reconstruction, use_cache, progress,
                manifest, native, min_reconstruction_psnr) -> BatchReport:
    run = BatchRun(items, out, defaults=defaults, manifest=manifest, engine="local")
    lazy = _LazyEditor(editor)
    n_edits = sum(len(it.edits) for it in items)
    with tqdm(total=len(items), desc="items", unit="item", disable=not progress) as ibar, \
            tqdm(total=n_edits, desc="edits", unit="edit", disable=not progress, leave=False) as ebar:
        for item in items:
            ibar.set_postfix_str(item.id)
            done_before = sum(is_complete_image(out / o) for o in
                              (f"{item.id}/{n}" for n in item.output_names()))
            ebar.update(done_before)
            rec = run_item(lazy, item, out, defaults=defaults, reconstruction=reconstruction,
                           use_cache=use_cache, edits_bar=ebar, native=native,
                           min_reconstruction_psnr=min_reconstruction_psnr)
            run.add(rec, worker=None if rec.resumed else "local")
            ibar.update(1)
    return run.finish()


def plan(items: list[BatchItem], out_dir: str | Path, *, defaults: dict[str, Any] | None = None,
         reconstruction: bool = True) -> list[str]:
    """Human-readable plan of a run (what ``--dry-run`` prints); loads no model."""
    out = Path(out_dir)
    lines, todo = [], 0
    for it in items:
        state = "" if it.image.is_file() else "  [image not found: this item will fail]"
        lines.append(f"{it.id}: {printable(it.image)}{state}")
        lines.append(f"  prompt: {printable(it.prompt)}")
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
            mask = it.mask_of(spec)
            if mask is not None:
                extra += f" mask={mask}" + ("" if mask.is_file() else " [mask not found]")
            lines.append(f"  {n}. {printable(spec.target)}{printable(extra)} -> {out / it.id / name}"
                         f" [{'done' if done else 'to do'}]")
    n_edits = sum(len(it.edits) for it in items)
    lines.append(f"{len(items)} item(s), {n_edits} edit(s), {todo} to do; outputs in "
                 f"{printable(out)}")
    return lines
