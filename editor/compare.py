"""Method comparison: the same images and edits through several configurations.

A *configuration* is an inversion method with its options plus edit options
(leakage mode, attention-injection windows, ...). :func:`run_compare` inverts
every case once per distinct inversion setting (batched, cached on disk like
:mod:`editor.batch`), applies the edit, measures, and writes

- ``OUT/grid.png``: rows = cases, columns = input, ground truth (when known) and
  one column per configuration, with labels;
- ``OUT/metrics.csv``: one row per case and configuration;
- ``OUT/summary.csv`` and ``OUT/summary.md``: per configuration means;
- ``OUT/raw/<config>/<case>.png`` (edit) and ``<case>.source.png`` (reconstruction).

Inputs:

- **ShapesBench** (:func:`shapes_bench`): generator scenes whose edit has an exact
  ground truth (the scene redrawn with the edit, :meth:`editor.scenes.Scene.with_object`)
  and exact masks: colour swaps, shape swaps, and two-object scenes where one
  object is edited and the other is protected. Measures edit accuracy,
  background preservation outside the edit mask, protected-object change.
- **PIE-Bench** (Ju et al. 2023; :func:`load_pie_bench`): ``mapping_file.json`` +
  ``annotation_images/``; background metrics outside the annotated mask, using
  PIE-Bench's masking convention (``"zero"``, see :mod:`editor.metrics`) by default.
- a batch manifest (:func:`manifest_cases`): reconstruction metrics only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from . import metrics as M
from . import scenes
from .cache import CACHE_DIR, InversionCache
from .fileio import (
    OutputLock,
    atomic_save_image,
    atomic_write_bytes,
    check_output_folder,
    printable,
    slugify,
)
from .images import load_image
from .manifest import read_manifest
from .options import EditOptions, InvertOptions

if TYPE_CHECKING:  # pragma: no cover
    from .facade import Editor

#: The methods a default comparison runs, in column order.
METHODS = ("ddim", "null-text", "negative-prompt", "direct")
INVERSION_OPTIONS = InvertOptions.names()
PIE_SIZE = (512, 512)
#: Prompt-to-Prompt settings of PIE-Bench's published runs (PnPInversion, run_editing_p2p.py)
PIE_P2P = {"cross_replace": 0.4, "self_replace": 0.6}
PIE_NOTE = ("structure distance (DINO ViT-B/8 self-similarity) is not computed: it needs DINO "
            "weights, which pivot-edit does not download")
#: DDIM steps of ``pivot-edit compare --bench shapes`` unless --steps is given (PIE-Bench uses 50)
SHAPES_BENCH_STEPS = 20


# -- configurations ------------------------------------------------------------------------------


@dataclass
class Config:
    """One column of the comparison: how to invert and how to edit (both validated when
    the configuration is made: :class:`~editor.options.InvertOptions` and
    :class:`~editor.options.EditOptions` fields)."""

    name: str
    method: str = "null-text"
    invert: dict[str, Any] = field(default_factory=dict)  # steps, guidance, num_inner_steps...
    edit: dict[str, Any] = field(default_factory=dict)  # EditOptions fields

    def __post_init__(self) -> None:
        try:
            self.invert_options()
            EditOptions.from_mapping(self.edit)
        except ValueError as exc:
            raise ValueError(f"configuration {self.name!r}: {exc}") from None

    def inversion_options(self) -> dict[str, Any]:
        return {"method": self.method, **self.invert}

    def invert_options(self) -> InvertOptions:
        return InvertOptions.from_mapping(self.inversion_options())

    def edit_options(self, case_options: dict[str, Any] | None = None) -> EditOptions:
        """This configuration's edit options over a case's own (PIE-Bench blend words...)."""
        return EditOptions.from_mapping({**(case_options or {}), **self.edit})


def _scalar(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip() not in ("null", "~", "") else value


def parse_config(spec: str, base_invert: dict[str, Any] | None = None) -> Config:
    """``NAME:key=value,key=value``; keys are inversion options or ``editor.edit`` options.

    Values are YAML scalars (``0.6``, ``none``, ``[0.1, 0.8]``). Example:
    ``"nti-noleak:method=null-text,leakage=none,cross_replace=0.6"``.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"configuration {spec!r} needs a name: NAME:key=value,...")
    inv = dict(base_invert or {})
    edit: dict[str, Any] = {}
    method = inv.pop("method", "null-text")
    for part in _split_options(rest):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"configuration {name!r}: expected key=value, got {part!r}")
        val = _scalar(value.strip())
        if key == "method":
            method = str(val)
        elif key in INVERSION_OPTIONS:
            inv[key] = val
        else:
            edit[key] = val
    if method not in METHODS:
        raise ValueError(f"configuration {name!r}: unknown method {method!r} (use {', '.join(METHODS)})")
    return Config(name, method, inv, edit)


def _split_options(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so lists survive)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in (p.strip() for p in parts) if p]


def default_configs(
    methods: Sequence[str] = METHODS, leakage: Sequence[str] | None = None,
    invert: dict[str, Any] | None = None, edit: dict[str, Any] | None = None,
) -> list[Config]:
    """The cross product methods x leakage modes (``None``: the engine's default leakage)."""
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown inversion method {m!r}; use {', '.join(METHODS)}")
        for leak in (leakage or [None]):
            e = dict(edit or {})
            name = m
            if leak is not None:
                e["leakage"] = leak
                name = f"{m}+{leak}"
            out.append(Config(name, m, dict(invert or {}), e))
    return out


# -- cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One image and one edit, with whatever ground truth is known."""

    id: str
    kind: str
    image: Image.Image
    prompt: str
    target: str
    edit_mask: np.ndarray | None = None  # bool, image resolution: where the edit may act
    ground_truth: Image.Image | None = None
    source_scene: scenes.Scene | None = None
    target_scene: scenes.Scene | None = None
    index: int | None = None  # edited object (ShapesBench)
    protected_mask: np.ndarray | None = None
    protect: str | None = None  # phrase of the protected object (passed as ``protect``)
    edit_options: dict[str, Any] = field(default_factory=dict)  # per-case options


def _edit_region(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Where an object edit may change pixels: both outlines, one pixel of margin."""
    return M.dilate((src > 0.05) | (tgt > 0.05), 1)


def shapes_bench(n_per_kind: int = 3, seed: int = 0, size: int = 64) -> list[Case]:
    """ShapesBench: colour swaps, shape swaps and protected two-object colour swaps.

    Every case carries the exact ground-truth image (the scene redrawn with the
    edit), the edit mask (union of the edited object's source and target
    outlines, dilated by one pixel) and, for two-object scenes, the protected
    object's mask and phrase. Deterministic in ``seed``.
    """
    if n_per_kind < 1:
        raise ValueError("n_per_kind must be at least 1")
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    for kind in ("color", "shape", "protected"):
        for k in range(n_per_kind):
            s = scenes.sample(int(rng.integers(0, 2**31 - 1)), n_objects=2 if kind == "protected" else 1,
                              size=size)
            sc = s.scene
            idx = int(rng.integers(0, len(sc.objects)))
            obj = sc.objects[idx]
            if kind == "shape":
                new = str(rng.choice([x for x in shapes if x != obj.shape]))
                tgt = sc.with_object(idx, shape=new)
            else:
                used = {o.color for o in sc.objects}
                new = str(rng.choice([c for c in colors if c not in used]))
                tgt = sc.with_object(idx, color=new)
            gt, t_masks = tgt.render()
            case = Case(
                id=f"{kind}-{k}", kind=kind, image=s.image, prompt=s.caption, target=tgt.caption(),
                edit_mask=_edit_region(s.masks[idx], t_masks[idx]), ground_truth=gt,
                source_scene=sc, target_scene=tgt, index=idx,
            )
            if kind == "protected":
                other = 1 - idx
                case.protected_mask = s.masks[other] > 0.5
                case.protect = sc.objects[other].phrase()
            cases.append(case)
    return cases


def decode_rle(rle: Sequence[int], shape: tuple[int, int] = PIE_SIZE, *, border: bool = True) -> np.ndarray:
    """PIE-Bench mask: ``[start, length, start, length, ...]`` over the row-major flattened
    mask; like PIE-Bench's ``mask_decode`` the one-pixel image border is set (it guards
    against annotation errors there)."""
    vals = [int(v) for v in rle]
    if len(vals) % 2:
        raise ValueError("RLE mask must hold (start, length) pairs")
    n = shape[0] * shape[1]
    flat = np.zeros(n, bool)
    for start, length in zip(vals[0::2], vals[1::2], strict=True):
        if start < 0 or length < 0:
            raise ValueError("RLE mask has a negative start or length")
        flat[start : min(start + length, n)] = True
    mask = flat.reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def encode_rle(mask: np.ndarray) -> list[int]:
    """Inverse of :func:`decode_rle` (without the border): runs of True as (start, length)."""
    flat = np.asarray(mask, bool).ravel().astype(np.int8)
    d = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    return [int(v) for pair in zip(starts, ends - starts, strict=True) for v in pair]


def load_pie_bench(folder: str | Path, *, types: Sequence[str] | None = None,
                   limit: int | None = None) -> list[Case]:
    """Read PIE-Bench's ``mapping_file.json`` and ``annotation_images/`` (Ju et al. 2023).

    Fields used per entry: ``image_path`` (relative to ``annotation_images``),
    ``original_prompt`` / ``editing_prompt`` (brackets removed), ``mask`` (RLE over
    512x512), ``editing_type_id`` and ``blended_word`` ("source target"; when both
    words are in the prompts, the case uses them for local blending and reweights the
    target word by 2, as PIE-Bench's P2P runs do).
    """
    root = Path(folder)
    mapping = root / "mapping_file.json"
    if not mapping.is_file():
        raise ValueError(f"{str(root)!r} is not a PIE-Bench folder: no mapping_file.json")
    try:
        entries = json.loads(mapping.read_text())
    except ValueError as exc:
        raise ValueError(f"{mapping}: not valid JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{mapping}: expected an object keyed by image id")
    cases = []
    for key, e in entries.items():
        try:
            etype = str(e["editing_type_id"])
            if types and etype not in types:
                continue
            img_path = root / "annotation_images" / e["image_path"]
            src = str(e["original_prompt"]).replace("[", "").replace("]", "")
            tgt = str(e["editing_prompt"]).replace("[", "").replace("]", "")
            mask_rle = e["mask"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{mapping}: entry {key!r} lacks field {exc}") from None
        image = load_image(img_path)
        mask = decode_rle(mask_rle, PIE_SIZE)  # PIE-Bench's masks are 512x512 like its images
        words = str(e.get("blended_word") or "").split()
        opts: dict[str, Any] = {}
        if len(words) == 2:
            lower_src, lower_tgt = src.lower().split(), tgt.lower().split()
            if words[0].lower() in lower_src and words[1].lower() in lower_tgt:
                opts = {"blend_words": words, "reweight": {words[1]: 2.0}}
        cases.append(Case(id=str(key), kind=f"pie-{etype}", image=image, prompt=" ".join(src.split()),
                          target=" ".join(tgt.split()), edit_mask=mask, edit_options=opts))
        if limit and len(cases) >= limit:
            break
    if not cases:
        raise ValueError(f"{mapping}: no entries" + (f" of types {', '.join(types)}" if types else ""))
    return cases


def manifest_cases(path: str | Path) -> list[Case]:
    """Cases from a batch manifest (each item's edits); no masks, so reconstruction metrics only."""
    cases = []
    for it in read_manifest(path):
        image = load_image(it.image)
        for n, spec in enumerate(it.edits, 1):
            cases.append(Case(id=f"{it.id}-{n}", kind="manifest", image=image, prompt=it.prompt,
                              target=spec.target, edit_options=dict(spec.options)))
    return cases


# -- running -------------------------------------------------------------------------------------


@dataclass
class Row:
    """Metrics of one case under one configuration (one line of metrics.csv)."""

    case: str
    kind: str
    config: str
    status: str = "ok"
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None

    def plain(self) -> dict[str, Any]:
        """The row as plain data, without its image (which is in ``OUT/raw/``)."""
        return {"case": self.case, "kind": self.kind, "config": self.config,
                "status": self.status, "error": self.error, "values": dict(self.values)}


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    img = img.convert("RGB")
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


def _fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) >= 128


def measure(case: Case, edited: Image.Image, source: Image.Image | None, *,
            convention: str = "select") -> dict[str, Any]:
    """All metrics for one edit; compared at the edited image's resolution."""
    size = edited.size
    inp = _fit(case.image, size)
    v: dict[str, Any] = {}
    if source is not None:
        rec = _fit(source, size)
        v["recon_psnr"] = M.psnr(inp, rec)
        v["recon_ssim"] = M.ssim(inp, rec)
    if case.edit_mask is not None:
        em = _fit_mask(case.edit_mask, size)
        if (~em).any():
            bg = M.background_metrics(inp, edited, em, convention=convention)
            v.update({"bg_psnr": bg["psnr"], "bg_ssim": bg["ssim"], "bg_mse": bg["mse"]})
            v["bg_lpips"] = M.lpips_distance(inp, edited, ~em)
        if em.any():
            v["clip_edited"] = M.clip_score(edited, case.target, em)
    v["clip_whole"] = M.clip_score(edited, case.target)
    if case.ground_truth is not None:
        v["gt_psnr"] = M.psnr(_fit(case.ground_truth, size), edited)
    if case.target_scene is not None and case.index is not None and size == (case.target_scene.size,) * 2:
        acc = M.edit_accuracy(edited, case.target_scene, case.index, source=case.source_scene)
        v.update({"edit_ok": acc.ok, "color_ok": acc.color_ok, "shape_ok": acc.shape_ok,
                  "read_color": acc.color, "read_shape": acc.shape})
    if case.protected_mask is not None:
        pm = _fit_mask(case.protected_mask, size)
        pc = M.protected_change(inp, edited, pm)
        v.update({"protected_psnr": pc.psnr, "protected_hue_shift": pc.hue_shift,
                  "protected_kept": pc.color_kept})
    return v


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


@dataclass
class CompareReport:
    configs: list[Config]
    cases: list[Case]
    rows: list[Row]
    out_dir: Path
    notes: list[str]
    seconds: float

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.rows, self.configs, self.cases)


def run_compare(
    editor: Editor, cases: list[Case], configs: list[Config], out_dir: str | Path, *,
    convention: str = "select", use_cache: bool = True, progress: bool = True,
    title: str = "comparison", notes: Sequence[str] = (), native: bool = False,
) -> CompareReport:
    """Run ``cases`` x ``configs``, measure, and write grid, tables and raw outputs.

    Edits of a case image larger than the working size come back at its size (the
    original's pixels outside each edit's mask) and are measured there, unless ``native``.
    """
    check_setup(cases, configs)
    out = check_output_folder(out_dir)
    with OutputLock(out, "pivot-edit compare run"):
        return _run_locked(editor, cases, configs, out, convention=convention,
                           use_cache=use_cache, progress=progress, title=title, notes=notes,
                           native=native)


def check_setup(cases: list[Case], configs: list[Config]) -> None:
    """A comparison needs cases and uniquely named configurations (both engines check)."""
    if not cases:
        raise ValueError("nothing to compare: no cases")
    if not configs:
        raise ValueError("nothing to compare: no configurations")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")


def inversion_groups(configs: Sequence[Config]) -> list[list[Config]]:
    """The configurations that share one inversion setting, in order of first appearance:
    the unit of work (one group inverts every case once, then runs its configurations)."""
    groups: dict[str, list[Config]] = {}
    for cfg in configs:
        groups.setdefault(json.dumps(cfg.inversion_options(), sort_keys=True), []).append(cfg)
    return list(groups.values())


def run_group(editor: Editor, cases: list[Case], configs: list[Config], out: Path, *,
              use_cache: bool, convention: str, native: bool, progress: bool,
              bar: Any) -> list[Row]:
    """Invert every case once under the setting ``configs`` share (from the cache, else in one
    batch), then edit, save (``OUT/raw/<config>/``) and measure each case under each of
    them. Returns the rows in configuration order, then case order; ``bar`` is ticked once
    per row."""
    cache = InversionCache(out / CACHE_DIR if use_cache else None)
    first = configs[0]
    bar.set_postfix_str(f"inverting ({first.method})")
    inversions = cache.get_many(editor, [(c.id, c.image, c.prompt) for c in cases],
                                first.invert_options(), progress=progress)
    rows: list[Row] = []
    sources: dict[str, Image.Image] = {}
    for cfg in configs:
        raw = out / "raw" / slugify(cfg.name)
        raw.mkdir(parents=True, exist_ok=True)
        for case in cases:
            bar.set_postfix_str(printable(f"{cfg.name} {case.id}"))
            row = Row(case.id, case.kind, cfg.name)
            inv = inversions[case.id]
            try:
                if isinstance(inv, BaseException):
                    raise inv
                row.values["invert_s"] = float(inv.stats.get("seconds", math.nan))
                opts = cfg.edit_options(case.edit_options)
                if case.protect and "protect" not in cfg.edit and "protect" not in case.edit_options:
                    opts = opts.replace(protect=[case.protect])
                t0 = time.perf_counter()
                big = case.image.size[0] * case.image.size[1] > inv.image_size[0] * inv.image_size[1]
                if big and not native:
                    res = editor.edit(inv, case.target, opts, original=case.image, progress=False)
                else:
                    res = editor.edit(inv, case.target, opts, progress=False)
                row.values["edit_s"] = time.perf_counter() - t0
                edited = res if isinstance(res, Image.Image) else res.image
                src = getattr(res, "source", None)
                if src is None:  # an engine without the source branch in its result
                    if case.id not in sources:
                        t0 = time.perf_counter()
                        sources[case.id] = editor.reconstruct(inv, progress=False)
                        row.values["recon_s"] = time.perf_counter() - t0
                    src = sources[case.id]
                atomic_save_image(edited, raw / f"{case.id}.png")
                atomic_save_image(src, raw / f"{case.id}.source.png")
                row.values.update(measure(case, edited, src, convention=convention))
                row.image = edited
            except Exception as exc:  # noqa: BLE001 - recorded in the table, the run goes on
                row.status, row.error = "failed", _error_text(exc)
            rows.append(row)
            bar.update(1)
    return rows


def in_config_order(rows: list[Row], configs: Sequence[Config]) -> list[Row]:
    """``rows`` (from groups, in any order) in configuration order, then case order."""
    by_config: dict[str, list[Row]] = {}
    for r in rows:
        by_config.setdefault(r.config, []).append(r)
    return [r for cfg in configs for r in by_config.get(cfg.name, [])]


def finish_compare(cases: list[Case], configs: list[Config], rows: list[Row], out: Path, *,
                   title: str, notes: Sequence[str], convention: str,
                   seconds: float) -> CompareReport:
    """The report, with grid, tables and summaries written (both engines end here)."""
    report = CompareReport(configs, cases, rows, out, [*M.optional_metrics_note(), *notes],
                           seconds)
    write_outputs(report, title=title, convention=convention)
    return report


def _run_locked(editor: Editor, cases: list[Case], configs: list[Config], out: Path, *,
                convention: str, use_cache: bool, progress: bool, title: str,
                notes: Sequence[str], native: bool) -> CompareReport:
    t_start = time.perf_counter()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    bar = tqdm(total=len(cases) * len(configs), desc="compare", unit="edit", disable=not progress)
    for group in inversion_groups(configs):
        rows += run_group(editor, cases, group, out, use_cache=use_cache, convention=convention,
                          native=native, progress=progress, bar=bar)
    bar.close()
    return finish_compare(cases, configs, in_config_order(rows, configs), out, title=title,
                          notes=notes, convention=convention,
                          seconds=time.perf_counter() - t_start)


# -- tables --------------------------------------------------------------------------------------

#: per-row metrics written to metrics.csv, in order
ROW_COLUMNS = [
    "edit_ok", "color_ok", "shape_ok", "read_color", "read_shape", "gt_psnr",
    "bg_psnr", "bg_ssim", "bg_mse", "bg_lpips", "protected_psnr", "protected_hue_shift",
    "protected_kept", "recon_psnr", "recon_ssim", "clip_whole", "clip_edited",
    "invert_s", "edit_s", "recon_s",
]


def summarize(rows: list[Row], configs: list[Config], cases: list[Case]) -> list[dict[str, Any]]:
    """Per configuration: accuracies (overall and per kind), means of the numeric metrics."""
    kinds = list(dict.fromkeys(c.kind for c in cases))
    acc_kinds = {r.kind for r in rows if "edit_ok" in r.values}
    out = []
    for cfg in configs:
        rs = [r for r in rows if r.config == cfg.name]
        ok = [r for r in rs if r.status == "ok"]
        s: dict[str, Any] = {"config": cfg.name, "method": cfg.method, "n": len(rs),
                             "failed": len(rs) - len(ok)}
        graded = [r for r in rs if r.kind in acc_kinds]  # a failed edit counts as wrong
        if graded:
            s["edit_acc"] = sum(bool(r.values.get("edit_ok")) for r in graded) / len(graded)
            for k in kinds:
                ks = [r for r in graded if r.kind == k]
                if ks:
                    s[f"acc_{k}"] = sum(bool(r.values.get("edit_ok")) for r in ks) / len(ks)
        for col in ("gt_psnr", "bg_psnr", "bg_ssim", "bg_mse", "bg_lpips", "protected_psnr",
                    "protected_hue_shift", "recon_psnr", "recon_ssim", "clip_whole", "clip_edited",
                    "invert_s", "edit_s", "recon_s"):
            m = M.finite_mean([r.values.get(col) for r in ok])
            if m is not None:
                s[col] = m
        kept = [r.values["protected_kept"] for r in ok if "protected_kept" in r.values]
        if kept:
            s["protected_kept"] = sum(kept) / len(kept)
        out.append(s)
    return out


_MD_COLUMNS = [
    ("edit_acc", "edit acc.", "pct"), ("acc_color", "colour swaps", "pct"),
    ("acc_shape", "shape swaps", "pct"), ("acc_protected", "2-object", "pct"),
    ("gt_psnr", "PSNR vs truth", "f1"), ("bg_psnr", "bg PSNR", "f1"), ("bg_ssim", "bg SSIM", "f3"),
    ("bg_mse", "bg MSE x1e4", "e4"), ("bg_lpips", "bg LPIPS", "f3"),
    ("protected_psnr", "protected PSNR", "f1"), ("protected_hue_shift", "protected hue shift", "deg"),
    ("protected_kept", "protected colour kept", "pct"), ("recon_psnr", "recon PSNR", "f1"),
    ("recon_ssim", "recon SSIM", "f3"), ("clip_whole", "CLIP whole", "f2"),
    ("clip_edited", "CLIP edited", "f2"), ("invert_s", "invert s", "f2"), ("edit_s", "edit s", "f2"),
    ("recon_s", "recon s", "f2"),
]


def _fmt(v: Any, how: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if how == "pct":
        return f"{100 * v:.0f}%"
    if how == "e4":
        return f"{1e4 * v:.1f}"
    if how == "deg":
        return f"{v:.1f}°"
    return f"{v:.{how[1]}f}"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    cols = [c for c in _MD_COLUMNS if any(c[0] in s for s in summary)]
    head = "| configuration | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for s in summary:
        cells = [_fmt(s.get(k), how) for k, _, how in cols]
        name = s["config"] + (f" ({s['failed']} failed)" if s.get("failed") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue().encode()


def write_outputs(report: CompareReport, *, title: str, convention: str) -> None:
    out = report.out_dir
    header = ["case", "kind", "config", "status", "error", *ROW_COLUMNS]
    atomic_write_bytes(out / "metrics.csv", _csv_bytes(header, [
        [r.case, r.kind, r.config, r.status, r.error, *[r.values.get(c) for c in ROW_COLUMNS]]
        for r in report.rows]))
    summary = report.summary()
    keys = list(dict.fromkeys(k for s in summary for k in s))
    atomic_write_bytes(out / "summary.csv", _csv_bytes(keys, [[s.get(k) for k in keys] for s in summary]))
    cfg_lines = [f"- **{c.name}**: method {c.method}"
                 + (f", inversion {json.dumps(c.invert, sort_keys=True)}" if c.invert else "")
                 + (f", edit {json.dumps(c.edit, sort_keys=True)}" if c.edit else "") for c in report.configs]
    kinds = {}
    for c in report.cases:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    md = [f"# {title}", "",
          f"{len(report.cases)} cases ({', '.join(f'{v} {k}' for k, v in kinds.items())}) x "
          f"{len(report.configs)} configurations; {report.seconds:.0f} s in all.", "",
          markdown_table(summary), "", "Configurations:", "", *cfg_lines, "",
          f"Background metrics outside the edit mask, mask convention '{convention}'. "
          "Accuracy: a failed edit counts as wrong. Times are means per case (inversion time as "
          "measured when the inversion was made; batched inversions share their time equally).", ""]
    md += [f"- {n}" for n in report.notes]
    failed = [r for r in report.rows if r.status != "ok"]
    if failed:
        md += ["", "Failed:", ""] + [f"- {r.config} / {r.case}: {r.error}" for r in failed]
    atomic_write_bytes(out / "summary.md", ("\n".join(md) + "\n").encode())
    grid = make_grid(report)
    atomic_save_image(grid, out / "grid.png")


# -- picture grid --------------------------------------------------------------------------------


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int = 4) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines[:max_lines]


def _cell_caption(values: dict[str, Any]) -> str:
    parts = []
    if "edit_ok" in values:
        parts.append("ok" if values["edit_ok"] else "wrong")
    if values.get("bg_psnr") is not None:
        bg = values["bg_psnr"]
        parts.append("bg inf" if math.isinf(bg) else f"bg {bg:.1f}dB")
    elif values.get("recon_psnr") is not None:
        parts.append(f"rec {values['recon_psnr']:.1f}dB")
    return " ".join(parts)


def make_grid(report: CompareReport, cell: int = 128) -> Image.Image:
    """Rows = cases, columns = input, ground truth (if any) and configurations, with labels."""
    cases, configs = report.cases, report.configs
    has_gt = any(c.ground_truth is not None for c in cases)
    columns = ["input"] + (["ground truth"] if has_gt else []) + [c.name for c in configs]
    font = _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w, head_h, cap_h, pad = 170, 34, 16, 4
    width = label_w + len(columns) * (cell + pad) + pad
    height = head_h + len(cases) * (cell + cap_h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        x = label_w + pad + j * (cell + pad)
        for k, line in enumerate(_wrap(probe, name, font, cell, 2)):
            draw.text((x, 4 + 13 * k), line, fill=(0, 0, 0), font=font)
    by_key = {(r.case, r.config): r for r in report.rows}
    for i, case in enumerate(cases):
        y = head_h + i * (cell + cap_h + pad)
        label = f"{case.id}: {case.target}"
        for k, line in enumerate(_wrap(probe, label, font, label_w - 8, 6)):
            draw.text((4, y + 2 + 13 * k), line, fill=(0, 0, 0), font=font)
        pics: list[tuple[Image.Image | None, str]] = [(case.image, "")]
        if has_gt:
            pics.append((case.ground_truth, ""))
        for cfg in configs:
            r = by_key.get((case.id, cfg.name))
            if r is None or r.status != "ok":
                pics.append((None, "failed"))
            else:
                pics.append((r.image, _cell_caption(r.values)))
        for j, (img, cap) in enumerate(pics):
            x = label_w + pad + j * (cell + pad)
            if img is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            else:
                img = img.convert("RGB")
                scale = cell / max(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
                grid.paste(img.resize(size, resample), (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))
            if cap and j > 0:
                draw.text((x, y + cell + 2), _wrap(probe, cap, font, cell, 1)[0], fill=(0, 0, 0), font=font)
    return grid
