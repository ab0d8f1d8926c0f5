"""The pivot-edit web app: invert a real image once, then edit it prompt after prompt.

``build_demo(editor)`` lays the page out; every event calls one of the module-level
handlers below (``invert_image``, ``edit_image``, ``load_inversion``, ...), each of
which takes an :class:`AppContext` (the shared, read-only editor, a folder for downloads
and the sessions' cancel flags; bound with :func:`functools.partial`) and the session's
:class:`Session` (a ``gr.State``). The inversion lives in that per-browser-session state,
never on the shared editor, so two people editing at once never see each other's images.
The handlers hold no engine logic: they validate input, call the
:class:`~editor.facade.Editor` verbs and turn errors into ``gr.Error``.

Two faces per verb: the page's buttons keep the last good results when an input is
refused (the message goes to the status line and a toast: ``*_page`` handlers), while
the named API endpoints (``gradio_client``: ``/invert``, ``/edit``, ``/load_inversion``)
raise the error to the caller. See docs/web-app.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402 - the analytics switch must be set before the import

from editor.compose import MASK_MODES  # noqa: E402
from editor.fileio import atomic_save_image, printable, slugify  # noqa: E402
from editor.images import MAX_IMAGE_PIXELS, image_hash, load_image, psnr  # noqa: E402
from editor.inversion import Inversion  # noqa: E402
from editor.options import LEAKAGE_MODES, METHODS, EditOptions, InvertOptions  # noqa: E402
from editor.progress import Cancelled  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from editor import Editor

#: the controls' initial values: the engine's own defaults
EDIT_DEFAULTS, INVERT_DEFAULTS = EditOptions(), InvertOptions()

#: Bounded queue: at most this many jobs waiting.
QUEUE_MAX_SIZE = 16
#: Every event that runs the model shares this concurrency group, limited to one job: a
#: per-event limit is not enough (an edit installs attention processors on the shared UNet,
#: so an inversion running beside it would go through them).
MODEL_QUEUE = "model"
#: Edits kept per inversion in the gallery (older ones drop off).
MAX_EDITS = 24
#: Images smaller than this (bundled model: 64 px) are shown enlarged, pixel for pixel.
DISPLAY_MIN_SIDE = 256
#: Full-size results are shown at most this large on the page (downloads are full size).
PREVIEW_MAX_SIDE = 1024
#: The working resolution can be raised to this many times the model's native pixel budget.
MAX_WORK_SCALE = 4
#: A session's inversion is forgotten after this many seconds without use.
SESSION_TTL_S = 2 * 3600

#: Page style; pass it to ``demo.launch(css=CSS)`` (Gradio 6 takes CSS at launch).
#: Small images (the bundled model's 64 px) fill their frame with visible pixels; the
#: before/after slider shows whole images (never cropped to its frame).
CSS = """
#image img, #reconstruction img { width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated; }
#slider img { object-fit: contain !important; width: 100%; height: 100%;
  image-rendering: pixelated; }
#edits img, #attention img { image-rendering: pixelated; }
#target textarea { min-width: 0; }
"""

SD15_HINT = (
    "To edit photos, load a Stable Diffusion checkpoint: `pivot-edit ui --model "
    "/path/to/sd15` (a local diffusers folder), `--model model.safetensors` (a single-file "
    "checkpoint) or `--model stable-diffusion-v1-5/stable-diffusion-v1-5` with network "
    "access."
)

log = logging.getLogger("pivot-edit.ui")


# -- plain data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppContext:
    """What every handler shares: the loaded editor (read-only), a folder for downloads, and
    one cancel flag per browser session (set by Cancel or when the session's tab closes)."""

    editor: Editor
    workdir: Path
    cancels: dict[str, threading.Event] = field(default_factory=dict, compare=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def cancel_flag(self, request: gr.Request | None) -> threading.Event:
        key = getattr(request, "session_hash", None) or "no-session"
        with self.lock:
            return self.cancels.setdefault(key, threading.Event())


@dataclass
class Session:
    """One browser session's state (``gr.State``): the current inversion and its edits.

    ``key`` identifies ``inversion`` (image hash, caption, method, steps, guidance, model
    fingerprint, working pixel budget); ``source`` is the image at the working size (None
    when the inversion came from a file); ``original`` the image at its own size when it is
    larger (edits are then returned at that size); ``last_mask`` the last edit's mask
    (working size, in [0, 1]).
    """

    key: tuple | None = None
    inversion: Inversion | None = None
    source: Image.Image | None = None
    reconstruction: Image.Image | None = None
    edits: list[tuple[Image.Image, str]] = field(default_factory=list)
    original: Image.Image | None = None
    last_mask: np.ndarray | None = None
    psnr: float | None = None
    warning: str | None = None


def make_context(editor: Editor, workdir: str | Path | None = None) -> AppContext:
    """An :class:`AppContext` with a fresh download folder (under the system temp dir)."""
    path = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pivot-edit-ui-"))
    path.mkdir(parents=True, exist_ok=True)
    return AppContext(editor=editor, workdir=path)


# -- small helpers ------------------------------------------------------------------------------


log = logging.getLogger("pivot-edit.ui")


def _fail(exc: Exception) -> gr.Error:
    """The engine's message, shown on the page (as plain text) and logged as one line."""
    log.info("refused: %s", printable(exc))
    return gr.Error(str(exc), print_exception=False)


def page_errors(fn):
    """Handlers raise :class:`gr.Error` only: an engine ``ValueError`` shows its message, any
    other failure a one-line description (type and message) instead of Gradio's bare
    "Error", and is logged with its traceback once."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as exc:
            raise _fail(exc) from None
        except Cancelled:
            log.info("%s cancelled", fn.__name__)
            raise gr.Error("Cancelled.", print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the operator
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__.replace('_', ' ')} failed: {type(exc).__name__}: "
                           f"{exc}"[:500], print_exception=False) from None

    return wrapper


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>&])")


def plain(text: object) -> str:
    """Untrusted text (a prompt from a received inversion file, a caption) shown in Markdown
    as plain text: every Markdown and HTML character escaped, so it can add no link, image
    or markup to the page."""
    return _MD_SPECIAL.sub(r"\\\1", printable(text)).replace("\n", " ")


def photo_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` whose own decoding of an upload fails with a message a person
    understands (Gradio's preprocessing opens the file before any handler runs).

    The instance's ``preprocess`` is wrapped rather than subclassing ``gr.Image``: Gradio
    writes a ``.pyi`` stub next to the module of every component subclass, which would
    write into an installed package (and fail where it is read-only)."""
    component = gr.Image(**kwargs)
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - a non-image or a decompression bomb
            log.info("upload refused: %s", printable(exc))
            raise gr.Error(f"The upload is not an image this app can read ({type(exc).__name__}); "
                           "upload a PNG, JPEG or WebP file of at most "
                           f"{MAX_IMAGE_PIXELS / 1e6:g} MP.", print_exception=False) from None

    component.preprocess = preprocess
    return component


def display(img: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """Enlarge a small image by a whole factor (nearest neighbour) so its pixels stay honest."""
    factor = -(-min_side // max(1, min(img.size)))
    if factor <= 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


def _new_file(ctx: AppContext, name: str) -> Path:
    """A fresh path ``<workdir>/<random>/<name>`` (one folder per download, no clashes).

    Download folders older than :data:`SESSION_TTL_S` are removed on the way.
    """
    cutoff = time.time() - SESSION_TTL_S
    for old in ctx.workdir.iterdir():
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another request removed it first
            pass
    folder = ctx.workdir / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    return folder / name


def parse_words(text: str | None) -> list[str]:
    """``"red, blue circle"`` -> ``["red", "blue circle"]`` (comma-separated, blanks dropped)."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def parse_reweight(text: str | None) -> dict[str, float] | None:
    """``"red=2.0, circle=0.5"`` -> ``{"red": 2.0, "circle": 0.5}``; empty -> None.

    Raises ``ValueError`` naming the part that is not ``word=number``.
    """
    out: dict[str, float] = {}
    for part in parse_words(text):
        word, sep, value = part.rpartition("=") if "=" in part else part.rpartition(":")
        word = word.strip()
        try:
            if not sep or not word:
                raise ValueError
            out[word] = float(value)
        except ValueError:
            raise ValueError(
                f"reweight: {part!r} is not word=number; write e.g. 'red=2.0, circle=0.5'"
            ) from None
    return out or None


def attention_picture(amap: Any, base: Image.Image | None, size: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """A cross-attention map (array or image) as a heat map over the greyed source image."""
    if isinstance(amap, Image.Image):
        arr = np.asarray(amap.convert("L"), dtype=np.float32)
    else:
        arr = np.asarray(getattr(amap, "detach", lambda: amap)(), dtype=np.float32)
        arr = arr.squeeze()
        if arr.ndim == 3:  # heads / channels first
            arr = arr.mean(axis=0)
    arr = arr - arr.min()
    arr = arr / arr.max() if arr.max() > 0 else arr
    side = max(size, *(base.size if base else (0,)))
    heat_small = Image.fromarray((arr * 255).astype(np.uint8), "L")
    w = side
    h = max(1, round(side * arr.shape[0] / arr.shape[1]))
    m = np.asarray(heat_small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    heat = np.stack([np.clip(3 * m, 0, 1), np.clip(3 * m - 1, 0, 1), np.clip(3 * m - 2, 0, 1)], -1)
    if base is not None:
        grey = np.asarray(base.convert("L").resize((w, h), Image.Resampling.BILINEAR), np.float32)
        grey = np.repeat(grey[..., None] / 255, 3, axis=-1)
        heat = 0.35 * grey + 0.65 * heat
    return Image.fromarray((heat * 255).round().astype(np.uint8), "RGB")


def leakage_modes() -> tuple[str, ...]:
    """The leakage modes the engine offers."""
    return tuple(LEAKAGE_MODES)


def example_files(folder: str | Path | None = None) -> list[tuple[str, str]]:
    """``(png path, caption)`` for each example image (``assets/examples`` by default).

    The caption comes from ``captions.json`` (``{"file.png": "caption"}``) in that folder,
    else from ``<name>.txt`` beside the image, else from the file name.
    """
    root = Path(folder) if folder else Path(str(resources.files("editor.assets") / "examples"))
    if not root.is_dir():
        return []
    captions: dict[str, str] = {}
    index = root / "captions.json"
    if index.is_file():
        captions = {str(k): str(v) for k, v in json.loads(index.read_text()).items()}
    out = []
    for png in sorted(root.glob("*.png")):
        text = captions.get(png.name) or captions.get(png.stem)
        side = png.with_suffix(".txt")
        if text is None and side.is_file():
            text = side.read_text().strip()
        out.append((str(png), text or png.stem.replace("_", " ").replace("-", " ")))
    return out


def model_markdown(editor: Editor) -> str:
    """The model line at the top of the page (plus the bundled model's notice)."""
    dtype = str(editor.dtype).removeprefix("torch.")
    text = (
        f"**Model:** `{editor.model_id}` · fingerprint `{editor.fingerprint}` · "
        f"{editor.device} / {dtype} · native size {editor.native_size} px"
    )
    load = getattr(getattr(editor, "model", None), "load_options", None)
    if load is not None and load.loras:  # fused in: part of the fingerprint
        names = ", ".join(f"`{Path(lo.path).name.replace('`', '')}` x {lo.scale:g}"
                          for lo in load.loras)
        text += f" · LoRA {names}"
    if load is not None and load.offload != "none":
        text += f" · offload {load.offload}"
    if getattr(editor, "is_bundled", editor.model_id == "shapes"):
        text += (
            "\n\n> **Bundled demo model:** it only knows simple shapes (circle, square, triangle "
            "in red, green, blue or yellow on a white, gray or black background), e.g. "
            "*a red circle on a white background*. " + SD15_HINT
        )
    if getattr(editor, "notice", None):
        text += f"\n\n> **Note:** {plain(editor.notice)} " + SD15_HINT
    return text


def preview(img: Image.Image) -> Image.Image:
    """An image for the page: small ones enlarged pixel for pixel, large ones shrunk."""
    if max(img.size) > PREVIEW_MAX_SIDE:
        k = PREVIEW_MAX_SIDE / max(img.size)
        return img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))),
                          Image.Resampling.LANCZOS)
    return display(img)


def _gallery(session: Session) -> list[tuple[Image.Image, str]]:
    return [(display(img), caption) for img, caption in session.edits]


def _quality(value: float | None, warning: str | None) -> str:
    if value is None:
        return ""
    text = f"Reconstruction PSNR **{value:.2f} dB**."
    if warning:
        text += f"\n\n> **Warning:** {plain(warning)}"
    return text


def _inversion_summary(inv: Inversion, quality: str, size: tuple[int, int] | None) -> str:
    secs = inv.stats.get("seconds") if isinstance(inv.stats, dict) else None
    took = f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""
    w, h = inv.image_size
    full = (f" Edits come back at the image's own size, {size[0]} x {size[1]}."
            if size and size[0] * size[1] > w * h else "")
    return (
        f"Inverted *{plain(inv.prompt)}* with **{inv.method}**, {inv.steps} steps, guidance "
        f"{inv.guidance:g}, at {w} x {h}{took}. {quality}{full} Now change a word of the "
        "target prompt and press **Edit**."
    )


def _progress_callback(progress, flag: threading.Event, offset: int, total: int, stages):
    """An engine callback that moves one page progress bar over the whole job (``stages``:
    ``(last step, name)`` pairs) and cancels when ``flag`` is set."""

    def callback(done: int, _total: int) -> bool:
        step = offset + done
        desc = next((name for last, name in stages if step <= last), stages[-1][1])
        try:
            progress((step, total), desc=desc, unit="steps")
        except Exception:  # noqa: BLE001 - outside an event (tests) progress is a stub
            pass
        return not flag.is_set()

    return callback


def mask_from_editor(value: Any) -> np.ndarray | None:
    """The painted strokes of a ``gr.ImageEditor`` value as a float mask (``None``: nothing
    painted). Strokes count by their alpha, on every layer."""
    if not value:
        return None
    if isinstance(value, dict):
        layers = [la for la in (value.get("layers") or []) if la is not None]
    else:
        layers = []
    masks = []
    for la in layers:
        if isinstance(la, (str, Path)):
            la = Image.open(la)
        arr = np.asarray(la.convert("RGBA") if isinstance(la, Image.Image) else la)
        if arr.ndim == 3 and arr.shape[-1] == 4:
            masks.append(arr[..., 3].astype(np.float32) / 255.0)
    if not masks:
        return None
    m = np.maximum.reduce(masks)
    return m if (m > 0.5).any() else None


def mask_layer(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A working-size mask as a translucent magenta layer at ``size`` (for the mask editor)."""
    a = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8), "L").resize(
        size, Image.Resampling.BILINEAR)
    alpha = a.point(lambda v: 160 if v > 127 else 0)
    layer = Image.new("RGBA", size, (255, 0, 128, 0))
    layer.putalpha(alpha)
    return layer


def mask_overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with ``mask`` (working size) tinted magenta: where the edit could act."""
    base = preview(image).convert("RGB")
    m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8), "L").resize(
        base.size, Image.Resampling.BILINEAR)
    tint = Image.new("RGB", base.size, (255, 0, 128))
    return Image.composite(Image.blend(base, tint, 0.45), base, m.point(lambda v: 255 if v > 127 else 0))


# -- handlers (module level, testable directly) ------------------------------------------------


def _whole(value: Any, name: str) -> int:
    """A slider's number as an integer (``50.0`` -> 50; ``50.5`` is an error)."""
    v = float(value)
    if not v.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(v)


def _work_pixels(editor: Editor, scale: float) -> int | None:
    """The working pixel budget for the "working resolution" control (x native budget)."""
    s = float(scale)
    if not 1.0 <= s <= MAX_WORK_SCALE:
        raise ValueError(f"working resolution must be 1 to {MAX_WORK_SCALE} times the model's "
                         f"native pixel budget, got {scale!r}")
    return None if s == 1.0 else int(s * editor.native_size**2)


@page_errors
def invert_image(
    ctx: AppContext,
    image: str | Path | Image.Image | None,
    caption: str,
    method: str,
    steps: float,
    guidance: float,
    session: Session | None,
    work_scale: float = 1.0,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's idiom
) -> tuple[Image.Image, str, str, list, Session, str, Any]:
    """Invert ``image`` under ``caption``; show the reconstruction and its PSNR.

    ``guidance`` is the classifier-free guidance scale the inversion is made for (null-text
    optimises its null embeddings for it); every edit of this inversion uses it.
    ``work_scale``: the working resolution, in multiples of the model's native pixel budget.

    Returns (reconstruction, status markdown, inversion file, edits gallery, session, the
    target prompt prefilled with the caption, the mask editor's value). An inversion with
    the same key as the session's current one is reused, not recomputed. One progress bar
    runs over the whole job (DDIM inversion, null-text optimisation, reconstruction); Cancel
    stops it at the next step.
    """
    editor = ctx.editor
    session = session or Session()
    if image is None:
        raise gr.Error("No image: upload one or pick an example first.")
    prompt = editor.check_prompt(caption or "", what="caption")
    options = InvertOptions(method=method, steps=_whole(steps, "steps"), guidance=float(guidance),
                            max_pixels=_work_pixels(editor, work_scale), check_reconstruction=False)
    img = load_image(image)
    steps, guidance = options.steps, options.guidance
    key = (image_hash(img), prompt, method, steps, guidance, editor.fingerprint, options.max_pixels)
    editor_value = {"background": img, "layers": [], "composite": None}
    if session.key == key and session.inversion is not None and session.reconstruction is not None:
        inv = session.inversion
        path = _save_inversion(ctx, inv)
        status = (_inversion_summary(inv, _quality(session.psnr, session.warning),
                                     (session.original or img).size)
                  + " (kept: same image, caption and settings)")
        return (display(session.reconstruction), status, str(path), _gallery(session), session,
                prompt, editor_value)
    flag = ctx.cancel_flag(request)  # cleared when the page's job starts and ends
    inv_total = 2 * steps if method == "null-text" else steps
    fp = editor.fast_path(options.fast) if method == "null-text" else None
    warm = " (first run: capturing CUDA graphs, once)" if fp and fp.warms_up("invert") else ""
    stages = ([(steps, "DDIM inversion" + warm), (2 * steps, "null-text optimisation" + warm)]
              if method == "null-text" else [(steps, f"{method} inversion")])
    stages.append((inv_total + steps, "reconstruction"))
    total = inv_total + steps
    inv = editor.invert(img, prompt, options,
                        callback=_progress_callback(progress, flag, 0, total, stages),
                        progress=False)
    recon, value, warning = editor.check_inversion(
        inv, img, callback=_progress_callback(progress, flag, inv_total, total, stages),
        progress=False)
    source = img if img.size == tuple(inv.image_size) else img.resize(
        tuple(inv.image_size), Image.Resampling.LANCZOS)
    original = img if img.size[0] * img.size[1] > inv.image_size[0] * inv.image_size[1] else None
    new = Session(key=key, inversion=inv, source=source, reconstruction=recon, edits=[],
                  original=original, psnr=value, warning=warning)
    path = _save_inversion(ctx, inv)
    status = _inversion_summary(inv, _quality(value, warning), img.size)
    return display(recon), status, str(path), [], new, prompt, editor_value


def _save_inversion(ctx: AppContext, inv: Inversion) -> Path:
    name = f"inversion-{inv.image_hash[:8]}-{inv.method}-{inv.steps}.safetensors"
    return inv.save(_new_file(ctx, name))


@page_errors
def edit_image(
    ctx: AppContext,
    target: str,
    cross_replace: float,
    self_replace: float,
    local_blend: bool,
    blend_words: str,
    reweight: str,
    protect: str,
    leakage: str,
    mask_threshold: float,
    session: Session | None,
    mask: Any = None,
    mask_mode: str = EDIT_DEFAULTS.mask_mode,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's idiom
) -> tuple[tuple[Image.Image, Image.Image], list, list, str, str, Session, str]:
    """Prompt-to-Prompt edit of the session's inversion towards ``target``.

    ``mask``: the mask editor's value (painted strokes: where the edit may act) or ``None``;
    ``mask_mode``: how it combines with the automatic mask. When the inverted image is
    larger than the working size, the edit comes back at its size (the image's pixels
    outside the edit's mask).

    Returns (before/after pair, edits gallery, attention-map gallery (the edit's mask first),
    edited image path (full size), status markdown, session, working-size image path).
    """
    editor = ctx.editor
    if session is None or session.inversion is None:
        raise gr.Error("Nothing to edit yet: invert an image first (or load an inversion file).")
    inv = session.inversion
    target = editor.check_prompt(target or "", what="target prompt")
    options = edit_options(cross_replace, self_replace, local_blend, blend_words, reweight,
                           protect, leakage, mask_threshold).replace(mask_mode=mask_mode)
    user_mask = mask_from_editor(mask) if not isinstance(mask, np.ndarray) else mask
    flag = ctx.cancel_flag(request)  # cleared when the page's job starts and ends
    fp = editor.fast_path(options.fast)  # "auto": CUDA graphs on CUDA, kept by the Editor
    stage = ("editing (first edit: capturing CUDA graphs, once)"
             if fp is not None and fp.warms_up("edit") and not editor.is_sdxl else "editing")
    cb = _progress_callback(progress, flag, 0, inv.steps, [(inv.steps, stage)])
    result = editor.edit(inv, target, options, mask=user_mask, original=session.original,
                         callback=cb, progress=False)
    edited, native = result.image, result.image_native or result.image
    before = session.original or session.source or result.source or session.reconstruction
    stem = f"edit-{slugify(target, 40)}"
    path = atomic_save_image(edited, _new_file(ctx, f"{stem}.png"))
    native_path = atomic_save_image(native, _new_file(ctx, f"{stem}-{native.width}px.png"))
    edits = ([(native, target)] + session.edits)[:MAX_EDITS]
    new = dataclasses.replace(session, edits=edits, last_mask=result.mask_image)
    base = session.source or result.source
    maps = []
    if result.mask_image is not None:
        maps.append((mask_overlay(base, result.mask_image), "where the edit could act"))
    maps += [(attention_picture(amap, base), str(word))
             for word, amap in (getattr(result, "attention_maps", None) or {}).items()]
    status = f"Edited to *{plain(target)}*"
    status += f", {edited.width} x {edited.height}." if edited.size != native.size else "."
    if before is not None and before.size == edited.size:
        status += f" PSNR to the source: {psnr(before, edited):.2f} dB."
    if result.options.get("notice"):
        status += f" {plain(result.options['notice'])}."
    return ((preview(before), preview(edited)), _gallery(new), maps, str(path), status, new,
            str(native_path))


def edit_options(
    cross_replace: float,
    self_replace: float,
    local_blend: bool,
    blend_words: str,
    reweight: str,
    protect: str,
    leakage: str,
    mask_threshold: float,
) -> EditOptions:
    """The advanced panel's fields as :class:`~editor.options.EditOptions`.

    Local blending off -> ``blend_words=None``; on with no words -> the engine's ``"auto"``
    (the words that differ between caption and target), whose mask is thresholded at
    ``mask_threshold`` (``noise_threshold``; ignored for named blend words, which use
    the words' attention maps).
    """
    kwargs: dict[str, Any] = {
        "cross_replace": float(cross_replace),
        "self_replace": float(self_replace),
        "noise_threshold": float(mask_threshold),
    }
    if not local_blend:
        kwargs["blend_words"] = None
    elif words := parse_words(blend_words):
        kwargs["blend_words"] = words
    if weights := parse_reweight(reweight):
        kwargs["reweight"] = weights
    if phrases := parse_words(protect):
        kwargs["protect"] = phrases
        kwargs["leakage"] = leakage
    return EditOptions.from_mapping(kwargs)


def invalidate(session: Session | None) -> tuple[Session, str, None, list, None]:
    """The image or caption changed: forget the inversion (returns cleared outputs)."""
    had = session is not None and session.inversion is not None
    status = "Image or caption changed: press **Invert** again." if had else ""
    return Session(), status, None, [], None


@page_errors
def load_inversion(
    ctx: AppContext,
    file: str | Path | None,
    session: Session | None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's idiom
) -> tuple[Session, str, str, int, float, Image.Image, str, list]:
    """Load an inversion file saved earlier; check it fits the loaded model.

    Returns (session, caption, method, steps, guidance, reconstruction, status, gallery).
    """
    if not file:
        raise gr.Error("No inversion file: choose a .safetensors file saved by this app.")
    inv = Inversion.load(file)
    inv.check_model(ctx.editor)
    flag = ctx.cancel_flag(request)  # cleared when the page's job starts and ends
    cb = _progress_callback(progress, flag, 0, inv.steps, [(inv.steps, "reconstruction")])
    recon = ctx.editor.reconstruct(inv, callback=cb, progress=False)
    key = (inv.image_hash, inv.prompt, inv.method, int(inv.steps), float(inv.guidance),
           inv.model_fingerprint, None)
    new = Session(key=key, inversion=inv, source=None, reconstruction=recon, edits=[])
    status = (
        f"Loaded an inversion of *{plain(inv.prompt)}* ({inv.method}, {inv.steps} steps). "
        "Type a target prompt and press **Edit**."
    )
    return (new, inv.prompt, inv.method, int(inv.steps), float(inv.guidance), display(recon),
            status, [])


def cancel_job(ctx: AppContext, request: gr.Request = None) -> str:
    """Cancel: the session's running job stops at its next step."""
    ctx.cancel_flag(request).set()
    return "Cancelling..."


def session_closed(ctx: AppContext, request: gr.Request = None) -> None:
    """The session's tab went away: stop its job (if any) and forget its flag."""
    key = getattr(request, "session_hash", None)
    if key is None:
        return
    with ctx.lock:
        flag = ctx.cancels.pop(key, None)
    if flag is not None:
        flag.set()


def use_last_mask(session: Session | None, image: Any) -> Any:
    """The last edit's mask as a brush layer over the image, to be corrected and reused."""
    if session is None or session.last_mask is None or image is None:
        raise gr.Error("No mask yet: edit once with local blending on, then take its mask.")
    img = load_image(image)
    return {"background": img, "layers": [mask_layer(session.last_mask, img.size)],
            "composite": None}


def on_page(fn, n_outputs: int, status_index: int):
    """The page's face of a handler: a refused input leaves every output as it was (the
    last good results stay on the page) and shows the message in the status line and a
    toast; the API endpoints use ``fn`` itself and get the error."""

    @functools.wraps(fn)
    def page(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            message = str(getattr(exc, "message", exc))
            gr.Warning(message)
            out = [gr.skip()] * n_outputs
            out[status_index] = f"**Not done:** {plain(message)}"
            return tuple(out)

    return page


def _buttons(ctx: AppContext, busy: bool, request: gr.Request = None):
    """Invert and Edit disabled while a job runs; Cancel enabled only then. The session's
    cancel flag is cleared before the job is queued and after it ended, so a Cancel pressed
    while the job waits in the queue still stops it."""
    ctx.cancel_flag(request).clear()
    return (gr.Button(interactive=not busy), gr.Button(interactive=not busy),
            gr.Button(interactive=busy), gr.Button(interactive=busy))


# -- the page -----------------------------------------------------------------------------------


def build_demo(
    editor: Editor,
    *,
    workdir: str | Path | None = None,
    examples_dir: str | Path | None = None,
    method: str = INVERT_DEFAULTS.method,
    steps: int = INVERT_DEFAULTS.steps,
) -> gr.Blocks:
    """The page: upload + caption -> Invert -> target prompt (and an optional mask) -> Edit.

    ``workdir`` is where downloads (edited images, inversion files) are written;
    ``method``/``steps`` are the initial inversion settings shown on the page.
    """
    ctx = make_context(editor, workdir)
    modes = leakage_modes()
    with gr.Blocks(title="pivot-edit", analytics_enabled=False,
                   delete_cache=(3600, SESSION_TTL_S)) as demo:
        session = gr.State(Session(), time_to_live=SESSION_TTL_S)
        gr.Markdown("# pivot-edit\nEdit a real image with words: invert it once (null-text "
                    "inversion), then rewrite its caption (Prompt-to-Prompt).")
        gr.Markdown(model_markdown(editor), elem_id="model-info")
        with gr.Row():
            with gr.Column(min_width=300):
                image = photo_input(label="1. Image", type="filepath", image_mode=None,
                                   sources=["upload", "clipboard"], height=300, elem_id="image")
                caption = gr.Textbox(label="Caption (describe the image)", elem_id="caption",
                                     placeholder="a red circle on a white background")
                with gr.Row():
                    method_in = gr.Dropdown(list(METHODS), value=method, label="Inversion method",
                                            elem_id="method", min_width=140)
                    steps_in = gr.Slider(5, 100, value=steps, step=1, label="Steps",
                                         elem_id="steps", min_width=140)
                    guidance = gr.Slider(1, 15, value=INVERT_DEFAULTS.guidance, step=0.5,
                                         label="Guidance", elem_id="guidance", min_width=140)
                work_scale = gr.Slider(
                    1, MAX_WORK_SCALE, value=1, step=0.5, elem_id="work-scale",
                    label=f"Working resolution (x the model's native {editor.native_size}x"
                          f"{editor.native_size} pixels; more costs that much more time and "
                          "memory)")
                with gr.Row():
                    invert_btn = gr.Button("Invert", variant="primary", elem_id="invert")
                    cancel_inv = gr.Button("Cancel", variant="stop", interactive=False,
                                           elem_id="cancel-invert")
                examples = example_files(examples_dir)
                if examples:
                    gr.Examples([list(e) for e in examples], inputs=[image, caption],
                                label="Examples (click one: image and caption)",
                                examples_per_page=8, visible_columns=[0],
                                example_labels=[c for _, c in examples])
            with gr.Column(min_width=300):
                recon = gr.Image(label="Reconstruction", interactive=False, format="png",
                                 height=300, elem_id="reconstruction")
                inv_file = gr.DownloadButton("Download inversion (.safetensors)", value=None,
                                             elem_id="inversion-download")
                load_file = gr.File(label="Load an inversion file", file_types=[".safetensors"],
                                    file_count="single", elem_id="inversion-upload", height=90)
        status = gr.Markdown(elem_id="status")
        target = gr.Textbox(label="2. Target prompt (the caption with a word changed)",
                            elem_id="target", placeholder="a blue circle on a white background")
        with gr.Row():
            edit_btn = gr.Button("Edit", variant="primary", elem_id="edit")
            cancel_edit = gr.Button("Cancel", variant="stop", interactive=False,
                                    elem_id="cancel-edit")
        with gr.Accordion("Where the edit may act (optional: paint a mask)", open=False,
                          elem_id="mask-panel"):
            mask_in = gr.ImageEditor(
                label="Paint over the region the edit may change (nothing painted: the "
                      "automatic mask)", type="pil", sources=(), transforms=(), layers=False,
                brush=gr.Brush(colors=[("#ff0080", 0.6)], default_color=("#ff0080", 0.6),
                               color_mode="fixed"),
                elem_id="mask-editor", height=380)
            with gr.Row():
                mask_mode = gr.Radio(list(MASK_MODES), value=EDIT_DEFAULTS.mask_mode,
                                     label="Mask mode (painted mask alone, or with the "
                                           "automatic mask)", elem_id="mask-mode")
                last_mask_btn = gr.Button("Start from the last edit's mask",
                                          elem_id="use-last-mask")
        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
            with gr.Row():
                cross = gr.Slider(0, 1, value=EDIT_DEFAULTS.cross_replace, step=0.05,
                                  label="Cross-attention replace (fraction of steps)")
                self_ = gr.Slider(0, 1, value=EDIT_DEFAULTS.self_replace, step=0.05,
                                  label="Self-attention replace (fraction of steps)")
            with gr.Row():
                local_blend = gr.Checkbox(True, label="Local blending (keep everything outside "
                                          "the edited words' region)")
                blend = gr.Textbox("", label="Blend words (comma-separated; empty: the changed words)",
                                   placeholder="circle")
                reweight = gr.Textbox("", label="Reweight (word=factor, comma-separated)",
                                      placeholder="blue=2.0, background=0.5")
                mask_threshold = gr.Slider(0.05, 0.95, value=EDIT_DEFAULTS.noise_threshold, step=0.05,
                                           label="Blend mask threshold (automatic blend; lower "
                                           "covers more)", elem_id="mask-threshold")
            with gr.Row():
                protect = gr.Textbox("", label="Protected phrases (comma-separated; must be in the "
                                     "target)", placeholder="white background")
                leakage = gr.Dropdown(list(modes), label="Leakage control for protected phrases",
                                      value=EDIT_DEFAULTS.leakage)
        with gr.Row():
            slider = gr.ImageSlider(label="Before / after", format="png", elem_id="slider",
                                    max_height=500)
            with gr.Column(min_width=300):
                edited_file = gr.DownloadButton("Download the edit (full size)", value=None,
                                                elem_id="edit-download")
                native_file = gr.DownloadButton("Download the edit at the working size",
                                                value=None, elem_id="native-download",
                                                size="sm")
                gallery = gr.Gallery(label="Edits of this inversion", columns=4, height=260,
                                     format="png", elem_id="edits", object_fit="contain",
                                     fit_columns=False, preview=False)
        maps = gr.Gallery(label="The edit's mask and its cross-attention per word (bright = "
                                "attends more)", columns=8, height=200, format="png",
                          elem_id="attention", fit_columns=False, object_fit="contain",
                          preview=False)

        buttons = [invert_btn, edit_btn, cancel_inv, cancel_edit]
        inv_inputs = [image, caption, method_in, steps_in, guidance, session, work_scale]
        inv_outputs = [recon, status, inv_file, gallery, session, target, mask_in]
        edit_inputs = [target, cross, self_, local_blend, blend, reweight, protect, leakage,
                       mask_threshold, session, mask_in, mask_mode]
        edit_outputs = [slider, gallery, maps, edited_file, status, session, native_file]
        model = dict(concurrency_id=MODEL_QUEUE)

        def chain(trigger, fn, inputs, outputs, status_index):
            (trigger(partial(_buttons, ctx, True), None, buttons, queue=False,
                     show_progress="hidden", api_visibility="private")
             .then(on_page(partial(fn, ctx), len(outputs), status_index), inputs, outputs,
                   api_visibility="private", **model)
             .then(partial(_buttons, ctx, False), None, buttons, queue=False,
                   show_progress="hidden", api_visibility="private"))

        chain(invert_btn.click, invert_image, inv_inputs, inv_outputs, 1)
        chain(edit_btn.click, edit_image, edit_inputs, edit_outputs, 4)
        chain(target.submit, edit_image, edit_inputs, edit_outputs, 4)
        for btn in (cancel_inv, cancel_edit):
            btn.click(partial(cancel_job, ctx), None, [status], queue=False,
                      api_visibility="private")
        # the API: the same handlers, errors raised to the caller
        api = gr.Button(visible=False)
        api.click(partial(invert_image, ctx), inv_inputs, inv_outputs, api_name="invert", **model)
        api.click(partial(edit_image, ctx), edit_inputs, edit_outputs, api_name="edit", **model)
        last_mask_btn.click(use_last_mask, [session, image], [mask_in], api_visibility="private",
                            concurrency_limit=None)
        cleared = [session, status, recon, gallery, inv_file]
        image.change(invalidate, [session], cleared, api_visibility="private",
                     concurrency_limit=None, show_progress="hidden")
        caption.input(invalidate, [session], cleared, api_visibility="private",
                      concurrency_limit=None, show_progress="hidden")
        load_file.upload(
            partial(load_inversion, ctx), [load_file, session],
            [session, caption, method_in, steps_in, guidance, recon, status, gallery],
            api_name="load_inversion", **model,
        )
        demo.unload(partial(session_closed, ctx))
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo
