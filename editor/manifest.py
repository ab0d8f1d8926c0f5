"""Batch manifests: reading, validating and planning, with no model loaded.

Formats (chosen by file extension):

- JSON Lines (``.jsonl``, ``.ndjson``): one item per line.
- YAML (``.yaml``, ``.yml``): a list of items, or a mapping with an ``items`` list.
- CSV (``.csv``): one edit per row, columns ``image,prompt,target`` plus optional
  option columns (any edit option or inversion option); rows with the same ``id`` (or,
  without an ``id`` column, the same image, prompt and inversion options) form one item.
  Cells are read as YAML scalars (``0.8``, ``true``, ``[a, b]``); empty cells are left out.

An item::

    {"id": "cat", "image": "cat.png", "prompt": "a cat sitting on a mat",
     "edits": ["a dog sitting on a mat",
               {"target": "a tiger sitting on a mat", "cross_replace": 0.6}],
     "inversion": {"method": "null-text", "steps": 50}}

``image`` is relative to the manifest's folder (or absolute); ``edits`` holds targets,
each a string or a mapping with ``target`` and per-edit options (the fields of
:class:`editor.options.EditOptions`); ``target`` is accepted for a single edit; ``id``
defaults to the image's file stem; inversion options (the fields of
:class:`editor.options.InvertOptions`) go under ``inversion`` or at the item's top level
and override the command line's defaults. Every option is validated when the manifest
is read, so a misspelled key or a bad value is a :class:`ManifestError` naming
``file:line`` before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import slugify
from .options import EditOptions, InvertOptions

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Names the runner itself uses in an output folder: no item may take them.
RESERVED_IDS = frozenset({"summary.json", ".cache", ".pivot-edit.lock", "raw", "grid.png",
                          "metrics.csv", "summary.csv", "summary.md"})
#: The largest manifest read (a manifest is text: 10,000 items fit in a few MB).
MAX_MANIFEST_BYTES = 64 * 2**20
_ITEM_KEYS = {"id", "image", "prompt", "edits", "target", "inversion", "mask"}
_INVERSION_KEYS = InvertOptions.names()


class ManifestError(ValueError):
    """A manifest that cannot be read: names the file, the line and the reason."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"manifest {where}: {reason}")


@dataclass
class EditSpec:
    """One target prompt and its edit options: ``options`` as the manifest gave them,
    ``resolved`` the validated :class:`~editor.options.EditOptions`."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)
    resolved: EditOptions = field(default_factory=EditOptions, compare=False, repr=False)
    #: a user mask for this edit (a path, relative to the manifest's folder or absolute)
    mask: Path | None = None


@dataclass
class BatchItem:
    """One image, its caption, its edits and (optionally) how to invert it."""

    id: str
    image: Path
    prompt: str
    edits: list[EditSpec]
    inversion: dict[str, Any] = field(default_factory=dict)
    line: int | None = None
    #: a user mask for every edit of the item that gives none of its own
    mask: Path | None = None

    def mask_of(self, spec: EditSpec) -> Path | None:
        return spec.mask or self.mask

    def output_names(self) -> list[str]:
        """File names of the edits, ``<n>-<slug>.png`` with n counting from 1."""
        return [f"{n}-{slugify(e.target)}.png" for n, e in enumerate(self.edits, 1)]


def inversion_options(item: BatchItem, defaults: dict[str, Any] | InvertOptions | None
                      ) -> InvertOptions:
    """The item's inversion options over the run's defaults (``None`` defaults dropped)."""
    if isinstance(defaults, InvertOptions):
        return InvertOptions.from_mapping(item.inversion, base=defaults)
    opts = {k: v for k, v in (defaults or {}).items() if v is not None}
    opts.update(item.inversion)
    return InvertOptions.from_mapping(opts)


# -- reading -------------------------------------------------------------------------------------


def _reason(exc: ValueError) -> str:
    msg = str(exc)
    return msg if msg.startswith("unknown") else f"bad value: {msg}"


def _check_inversion_options(opts: dict[str, Any], path: Path, line: int | None) -> dict[str, Any]:
    try:
        InvertOptions.from_mapping(opts)
    except ValueError as exc:
        raise ManifestError(path, line, _reason(exc)) from None
    return dict(opts)


def _path(value: Any, manifest: Path, line: int | None, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(manifest, line, f"{what!r} must be a path (relative to the manifest, "
                            "or absolute)")
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else manifest.parent / p


def _parse_edit(raw: Any, path: Path, line: int | None) -> EditSpec:
    if isinstance(raw, str):
        raw = {"target": raw}
    if not isinstance(raw, dict):
        raise ManifestError(path, line, f"an edit must be a target string or a mapping, got {raw!r}")
    target = raw.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ManifestError(path, line, "an edit needs a non-empty 'target' prompt")
    opts = {k: v for k, v in raw.items() if k not in ("target", "mask")}
    try:
        resolved = EditOptions.from_mapping(opts)
    except ValueError as exc:
        raise ManifestError(path, line, f"edit {target.strip()!r}: {_reason(exc)}") from None
    mask = _path(raw["mask"], path, line, "mask") if raw.get("mask") is not None else None
    return EditSpec(target.strip(), opts, resolved, mask)


def parse_item(raw: Any, *, path: Path, line: int | None) -> BatchItem:
    """Validate one manifest item (a mapping) and resolve its image path."""
    if not isinstance(raw, dict):
        raise ManifestError(path, line, f"an item must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ITEM_KEYS - set(_INVERSION_KEYS)
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
    edits = [_parse_edit(e, path, line) for e in edits_raw]
    inv = raw.get("inversion") or {}
    if not isinstance(inv, dict):
        raise ManifestError(path, line, "'inversion' must be a mapping of inversion options")
    inv = {**{k: raw[k] for k in _INVERSION_KEYS if k in raw}, **inv}
    inv = _check_inversion_options(inv, path, line)
    item_id = raw.get("id")
    if item_id is not None:
        item_id = str(item_id)
        if not _ID_RE.fullmatch(item_id):
            raise ManifestError(path, line, f"id {item_id!r} must be 1-128 letters, digits, '.', "
                                "'_' or '-', starting with a letter or digit (it names the "
                                "output folder)")
        if item_id.lower() in RESERVED_IDS:
            raise ManifestError(path, line, f"id {item_id!r} is a name the runner uses itself in "
                                "the output folder; choose another")
    img_path = Path(image.strip()).expanduser()
    if not img_path.is_absolute():
        img_path = path.parent / img_path
    mask = _path(raw["mask"], path, line, "mask") if raw.get("mask") is not None else None
    return BatchItem(id=item_id or "", image=img_path, prompt=" ".join(prompt.split()),
                     edits=edits, inversion=inv, line=line, mask=mask)


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


def _refuse_aliases(path: Path, text: str) -> None:
    """YAML aliases (``*name``) can make a few kilobytes expand to gigabytes ("billion
    laughs"); a manifest has no use for them, so any alias is refused before loading."""
    import yaml

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ManifestError(path, event.start_mark.line + 1,
                                f"YAML aliases (*{event.anchor}) are not allowed in a manifest; "
                                "write each item out")


def _read_yaml(path: Path, text: str) -> list[BatchItem]:
    import yaml

    try:
        _refuse_aliases(path, text)
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
    return [parse_item(raw, path=path, line=ln) for raw, ln in zip(data, lines, strict=True)]


def _read_jsonl(path: Path, text: str) -> list[BatchItem]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, n, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        items.append(parse_item(raw, path=path, line=n))
    return items


def _csv_cell(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list, dict)) or value is None else text


def _read_csv(path: Path, text: str) -> list[BatchItem]:
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
        inv = {k: _csv_cell(v) for k, v in cells.items() if k in _INVERSION_KEYS}
        edit = {k: _csv_cell(v) for k, v in cells.items()
                if k not in _INVERSION_KEYS and k not in ("id", "image", "prompt")}
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
    return [parse_item(g["raw"], path=path, line=g["line"]) for g in groups.values()]


def read_manifest(path: str | Path) -> list[BatchItem]:
    """Read and validate a manifest; :class:`ManifestError` (a ValueError) names the line."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(path, None, "is a folder, not a manifest file")
    if not path.is_file():
        raise ManifestError(path, None, "file not found")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(path, None, f"is {size / 2**20:.0f} MB; manifests are read up to "
                            f"{MAX_MANIFEST_BYTES // 2**20} MB (split it into several)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, None, f"cannot read it as UTF-8 text ({exc})") from None
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        items = _read_jsonl(path, text)
    elif ext in (".yaml", ".yml"):
        items = _read_yaml(path, text)
    elif ext == ".csv":
        items = _read_csv(path, text)
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


