"""Batch edits from a manifest: invert each image once, apply all its edits, resume after a kill.

Manifest formats (chosen by file extension):

- JSON Lines (``.jsonl``, ``.ndjson``): one item per line.
- YAML (``.yaml``, ``.yml``): a list of items, or a mapping with an ``items`` list.
- CSV (``.csv``): one edit per row, columns ``image,prompt,target`` plus optional
  option columns (any edit option or inversion option, see below); rows with the
  same ``id`` (or, without an ``id`` column, the same image, prompt and inversion
  options) form one item. Cells are read as YAML scalars (``0.8``, ``true``,
  ``[a, b]``); empty cells are left out.

An item::

    {"id": "cat", "image": "cat.png", "prompt": "a cat sitting on a mat",
     "edits": ["a dog sitting on a mat",
               {"target": "a tiger sitting on a mat", "cross_replace": 0.6}],
     "inversion": {"method": "null-text", "steps": 50}}

``image`` is relative to the manifest's folder (or absolute); ``edits`` holds
targets, each a string or a mapping with ``target`` and per-edit options (any
keyword of :func:`editor.editing.edit`); ``target`` is accepted for a single
edit; ``id`` defaults to the image's file stem; inversion options (keywords of
:func:`editor.inversion.invert`) go under ``inversion`` or at the item's top
level and override the command line's defaults.

Outputs: ``OUT/<id>/<n>-<slug of target>.png``, ``OUT/<id>/reconstruction.png``
and ``OUT/summary.json``; inversions are cached in ``OUT/.cache`` keyed by the
image's pixel hash, prompt, model fingerprint, method and its parameters. Every
file is written to a temporary name and renamed into place, so a run killed at
any moment (even ``kill -9``) leaves only complete files or hidden ``.tmp``
files, and a rerun skips exactly the outputs that are complete.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm.auto import tqdm

from .images import image_hash, load_image

if TYPE_CHECKING:  # pragma: no cover
    from .inversion import Inversion
    from .model import Editor

SUMMARY = "summary.json"
CACHE_DIR = ".cache"
RECONSTRUCTION = "reconstruction.png"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ITEM_KEYS = {"id", "image", "prompt", "edits", "target", "inversion"}
# Options of editor.inversion.invert that describe *how* to invert (callback/progress excluded).
_INVERSION_TYPES: dict[str, type | tuple[type, ...]] = {
    "method": str, "steps": int, "guidance": (int, float), "num_inner_steps": int,
    "early_stop_epsilon": (int, float, type(None)), "max_pixels": (int, type(None)),
}


class ManifestError(ValueError):
    """A manifest that cannot be read: names the file, the line and the reason."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"manifest {where}: {reason}")


@dataclass
class EditSpec:
    """One target prompt and its edit options (keywords of :func:`editor.editing.edit`)."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchItem:
    """One image, its caption, its edits and (optionally) how to invert it."""

    id: str
    image: Path
    prompt: str
    edits: list[EditSpec]
    inversion: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    def output_names(self) -> list[str]:
        """File names of the edits, ``<n>-<slug>.png`` with n counting from 1."""
        return [f"{n}-{slugify(e.target)}.png" for n, e in enumerate(self.edits, 1)]


# -- small utilities ---------------------------------------------------------------------------


def slugify(text: str, max_len: int = 60) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = "-".join(words)[:max_len].strip("-")
    return slug or "edit"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_image(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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


def _edit_option_names() -> set[str] | None:
    """Keyword options of :func:`editor.editing.edit`, or None while that module is absent."""
    try:
        from .editing import edit
    except ImportError:
        return None
    params = inspect.signature(edit).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("callback", "progress")}


def _invert_methods() -> tuple[str, ...]:
    from .inversion import METHODS

    return METHODS


# -- reading manifests ---------------------------------------------------------------------------


def _check_inversion_options(opts: dict[str, Any], path: Path, line: int | None) -> dict[str, Any]:
    for k, v in opts.items():
        if k not in _INVERSION_TYPES:
            raise ManifestError(path, line, f"unknown inversion option {k!r} "
                                f"(expected one of {', '.join(_INVERSION_TYPES)})")
        want = _INVERSION_TYPES[k]
        if not isinstance(v, want) or isinstance(v, bool):
            raise ManifestError(path, line, f"inversion option {k!r} has a bad value {v!r}")
    if "method" in opts and opts["method"] not in _invert_methods():
        raise ManifestError(path, line, f"unknown inversion method {opts['method']!r} "
                            f"(expected one of {', '.join(_invert_methods())})")
    return dict(opts)


def _parse_edit(raw: Any, path: Path, line: int | None, names: set[str] | None) -> EditSpec:
    if isinstance(raw, str):
        raw = {"target": raw}
    if not isinstance(raw, dict):
        raise ManifestError(path, line, f"an edit must be a target string or a mapping, got {raw!r}")
    target = raw.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ManifestError(path, line, "an edit needs a non-empty 'target' prompt")
    opts = {k: v for k, v in raw.items() if k != "target"}
    if names is not None:
        for k in opts:
            if k not in names:
                raise ManifestError(path, line, f"unknown edit option {k!r} "
                                    f"(editor.edit takes: {', '.join(sorted(names))})")
    return EditSpec(target.strip(), opts)


def parse_item(raw: Any, *, path: Path, line: int | None, names: set[str] | None = None) -> BatchItem:
    """Validate one manifest item (a mapping) and resolve its image path."""
    if not isinstance(raw, dict):
        raise ManifestError(path, line, f"an item must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ITEM_KEYS - set(_INVERSION_TYPES)
    if unknown:
        raise ManifestError(path, line, f"unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                            f"(an item has {', '.join(sorted(_ITEM_KEYS))} and inversion options)")
    image = raw.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ManifestError(path, line, "missing 'image' (a path relative to the manifest, or absolute)")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError(path, line, "missing 'prompt' (the caption of the source image)")
    if "edits" in raw and "target" in raw:
        raise ManifestError(path, line, "give either 'edits' (a list) or 'target', not both")
    edits_raw = raw.get("edits", [raw["target"]] if "target" in raw else None)
    if not isinstance(edits_raw, list) or not edits_raw:
        raise ManifestError(path, line, "missing 'edits': a non-empty list of target prompts")
    edits = [_parse_edit(e, path, line, names) for e in edits_raw]
    inv = raw.get("inversion") or {}
    if not isinstance(inv, dict):
        raise ManifestError(path, line, "'inversion' must be a mapping of inversion options")
    inv = {**{k: raw[k] for k in _INVERSION_TYPES if k in raw}, **inv}
    inv = _check_inversion_options(inv, path, line)
    item_id = raw.get("id")
    if item_id is not None:
        item_id = str(item_id)
        if not _ID_RE.match(item_id):
            raise ManifestError(path, line, f"id {item_id!r} must be letters, digits, '.', '_' "
                                "or '-' (it names the output folder)")
    img_path = Path(image.strip()).expanduser()
    if not img_path.is_absolute():
        img_path = path.parent / img_path
    return BatchItem(id=item_id or "", image=img_path, prompt=" ".join(prompt.split()),
                     edits=edits, inversion=inv, line=line)


def _yaml_lines(text: str) -> list[int | None]:
    """Line number (1-based) of each item of a YAML manifest, from the composed node tree."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == "items":
                node = v
                break
    if isinstance(node, yaml.SequenceNode):
        return [n.start_mark.line + 1 for n in node.value]
    return []


def _read_yaml(path: Path, text: str, names: set[str] | None) -> list[BatchItem]:
    import yaml

    try:
        data = yaml.safe_load(text)
        lines = _yaml_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(path, mark.line + 1 if mark else None, f"not valid YAML: {reason}") from None
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if not isinstance(data, list):
        raise ManifestError(path, 1, "a YAML manifest is a list of items (or a mapping with 'items')")
    lines += [None] * (len(data) - len(lines))
    return [parse_item(raw, path=path, line=ln, names=names) for raw, ln in zip(data, lines, strict=True)]


def _read_jsonl(path: Path, text: str, names: set[str] | None) -> list[BatchItem]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, n, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        items.append(parse_item(raw, path=path, line=n, names=names))
    return items


def _csv_cell(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list, dict)) or value is None else text


def _read_csv(path: Path, text: str, names: set[str] | None) -> list[BatchItem]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in ("image", "prompt", "target") if c not in header]
    if missing:
        raise ManifestError(path, 1, f"CSV header lacks column(s) {', '.join(missing)} "
                            "(needs image,prompt,target plus optional option columns)")
    groups: dict[str, dict[str, Any]] = {}
    for row in reader:
        line = reader.line_num
        if None in row:
            raise ManifestError(path, line, "more cells than header columns")
        cells = {k: v.strip() for k, v in row.items() if v is not None and v.strip() != ""}
        if not cells:
            continue
        inv = {k: _csv_cell(v) for k, v in cells.items() if k in _INVERSION_TYPES}
        edit = {k: _csv_cell(v) for k, v in cells.items()
                if k not in _INVERSION_TYPES and k not in ("id", "image", "prompt")}
        edit["target"] = cells.get("target", "")
        key = cells.get("id") or json.dumps([cells.get("image"), cells.get("prompt"), inv],
                                            sort_keys=True)
        if key not in groups:
            groups[key] = {"raw": {k: cells[k] for k in ("id", "image", "prompt") if k in cells}
                           | {"inversion": inv, "edits": []}, "line": line}
        g = groups[key]["raw"]
        if (g.get("image"), g.get("prompt"), g["inversion"]) != (cells.get("image"), cells.get("prompt"), inv):
            raise ManifestError(path, line, f"rows of id {cells.get('id')!r} disagree on "
                                "image, prompt or inversion options")
        g["edits"].append(edit)
    return [parse_item(g["raw"], path=path, line=g["line"], names=names) for g in groups.values()]


def read_manifest(path: str | Path) -> list[BatchItem]:
    """Read and validate a manifest; :class:`ManifestError` (a ValueError) names the line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, None, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, None, f"cannot read it as UTF-8 text ({exc})") from None
    names = _edit_option_names()
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        items = _read_jsonl(path, text, names)
    elif ext in (".yaml", ".yml"):
        items = _read_yaml(path, text, names)
    elif ext == ".csv":
        items = _read_csv(path, text, names)
    else:
        raise ManifestError(path, None, f"unknown manifest type {ext!r}: use .jsonl, .yaml/.yml or .csv")
    if not items:
        raise ManifestError(path, None, "the manifest has no items")
    _assign_ids(path, items)
    return items


def _assign_ids(path: Path, items: list[BatchItem]) -> None:
    """Explicit ids must be unique; missing ids become the image stem (made unique with -2, -3...)."""
    seen: dict[str, int | None] = {}
    for it in items:
        if it.id:
            if it.id in seen:
                raise ManifestError(path, it.line, f"duplicate id {it.id!r} (first on line {seen[it.id]})")
            seen[it.id] = it.line
    for it in items:
        if not it.id:
            base = slugify(it.image.stem, 40) if it.image.stem else "item"
            cand, k = base, 2
            while cand in seen:
                cand, k = f"{base}-{k}", k + 1
            it.id = cand
            seen[cand] = it.line


# -- the run ----------------------------------------------------------------------------------


def inversion_options(item: BatchItem, defaults: dict[str, Any] | None) -> dict[str, Any]:
    """The item's inversion options over the run's defaults (None defaults dropped)."""
    opts = {k: v for k, v in (defaults or {}).items() if v is not None}
    opts.update(item.inversion)
    return opts


def _effective_options(options: dict[str, Any]) -> dict[str, Any]:
    """Inversion options with :func:`editor.inversion.invert_batch`'s defaults filled in and
    the null-text-only ones dropped for other methods (so equal settings share a cache key)."""
    from .inversion import invert_batch

    params = inspect.signature(invert_batch).parameters
    full = {k: params[k].default for k in _INVERSION_TYPES if k in params}
    full.update(options)
    if full.get("method") != "null-text":
        full.pop("num_inner_steps", None)
        full.pop("early_stop_epsilon", None)
    if isinstance(full.get("guidance"), int):
        full["guidance"] = float(full["guidance"])
    return full


def cache_key(image_digest: str, prompt: str, fingerprint: str, options: dict[str, Any]) -> str:
    """Hash of everything that determines an inversion (and nothing else)."""
    payload = json.dumps({"image": image_digest, "prompt": " ".join(prompt.split()),
                          "model": fingerprint, "options": _effective_options(options)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


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


def get_inversion(
    editor: Editor, image: Image.Image, prompt: str, options: dict[str, Any], cache_dir: Path | None,
) -> tuple[Inversion, bool]:
    """Load the cached inversion of ``image`` under ``prompt`` or invert (and cache) it.

    Returns ``(inversion, came_from_cache)``. A damaged cache file is ignored.
    """
    from .inversion import Inversion

    key = cache_key(image_hash(image), prompt, editor.fingerprint, options)
    path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            inv = Inversion.load(path)
            inv.check_model(editor)
            return inv, True
        except ValueError:
            pass
    inv = editor.invert(image, prompt, **options)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        inv.save(path)
    return inv, False


def _run_edits(
    editor: Editor, inv: Inversion, todo: list[tuple[int, EditSpec]], save: Callable[[int, Any], None],
    bar: Any,
) -> list[str]:
    """Apply the edits in ``todo``; edits with identical options share one ``edit_many`` run.
    A refused group is retried edit by edit so one bad target does not sink the others."""
    groups: dict[str, list[tuple[int, EditSpec]]] = {}
    for n, spec in todo:
        groups.setdefault(json.dumps(spec.options, sort_keys=True, default=str), []).append((n, spec))
    errors: list[str] = []

    def single(n: int, spec: EditSpec) -> None:
        try:
            save(n, editor.edit(inv, spec.target, **spec.options))
        except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
            errors.append(f"edit {n} ({spec.target!r}): {_error_text(exc)}")
        bar.update(1)

    for group in groups.values():
        if len(group) == 1:
            single(*group[0])
            continue
        try:
            results = editor.edit_many(inv, [s.target for _, s in group], **group[0][1].options)
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
        cache = out_dir / CACHE_DIR if use_cache else None
        inv, record.inversion_cached = get_inversion(ed, image, item.prompt, opts, cache)
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
        opts = inversion_options(it, defaults)
        lines.append("  inversion: " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"))
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
