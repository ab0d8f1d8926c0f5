"""The pivot-edit web app: invert a real image once, then edit it prompt after prompt.

``build_demo(editor)`` lays the page out; every event calls one of the module-level
handlers below (``invert_image``, ``edit_image``, ``load_inversion``, ...), each of
which takes an :class:`AppContext` (the shared, read-only editor plus a folder for
downloads; bound with :func:`functools.partial`) and the session's :class:`Session`
(a ``gr.State``). The inversion lives in that per-browser-session state, keyed by
(image hash, caption, method, steps, guidance, model fingerprint), never on the shared
editor, so two people editing at once never see each other's images. The handlers hold no
engine logic: they validate input, call the :class:`~editor.model.Editor` verbs and
turn ``ValueError`` into ``gr.Error`` (a message on the page; the app keeps running).

Named API endpoints (``gradio_client``): ``/invert`` and ``/edit``; see docs/web-app.md.
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

from editor.fileio import printable, slugify  # noqa: E402
from editor.images import MAX_IMAGE_PIXELS, image_hash, load_image, psnr  # noqa: E402
from editor.inversion import Inversion  # noqa: E402
from editor.options import LEAKAGE_MODES, METHODS, EditOptions, InvertOptions  # noqa: E402

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
#: A session's inversion is forgotten after this many seconds without use.
SESSION_TTL_S = 2 * 3600

#: Page style; pass it to ``demo.launch(css=CSS)`` (Gradio 6 takes CSS at launch).
#: Small images (the bundled model's 64 px) fill their frame with visible pixels.
CSS = """
#image img, #reconstruction img { width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated; }
#slider img, #edits img, #attention img { image-rendering: pixelated; }
"""

SD15_HINT = (
    "To edit photos, run Stable Diffusion 1.5: `pivot-edit ui --model /path/to/sd15` "
    "(a local diffusers folder) or `pivot-edit ui --model "
    "stable-diffusion-v1-5/stable-diffusion-v1-5` with network access."
)


# -- plain data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppContext:
    """What every handler shares: the loaded editor (read-only) and a folder for downloads."""

    editor: Editor
    workdir: Path


@dataclass
class Session:
    """One browser session's state (``gr.State``): the current inversion and its edits.

    ``key`` is (image hash, caption, method, steps, guidance, model fingerprint) of
    ``inversion``;
    ``source`` is the image as inverted (None when the inversion came from a file).
    """

    key: tuple[str, str, str, int, float, str] | None = None
    inversion: Inversion | None = None
    source: Image.Image | None = None
    reconstruction: Image.Image | None = None
    edits: list[tuple[Image.Image, str]] = field(default_factory=list)


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


class PhotoInput(gr.Image):
    """``gr.Image`` whose own decoding of an upload fails with a message a person understands
    (Gradio's preprocessing opens the file before any handler runs)."""

    @classmethod
    def get_block_name(cls) -> str:
        return "image"

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - a non-image or a decompression bomb
            log.info("upload refused: %s", printable(exc))
            raise gr.Error(f"The upload is not an image this app can read ({type(exc).__name__}); "
                           "upload a PNG, JPEG or WebP file of at most "
                           f"{MAX_IMAGE_PIXELS / 1e6:g} MP.", print_exception=False) from None
    from collections.abc import Callable, Sequence
    from typing import TYPE_CHECKING, Any, Literal

    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


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
    if getattr(editor, "is_bundled", editor.model_id == "shapes"):
        text += (
            "\n\n> **Bundled demo model:** it only knows simple shapes (circle, square, triangle "
            "in red, green, blue or yellow on a white, gray or black background), e.g. "
            "*a red circle on a white background*. " + SD15_HINT
        )
    if getattr(editor, "notice", None):
        text += f"\n\n> {editor.notice}"
    return text


def _gallery(session: Session) -> list[tuple[Image.Image, str]]:
    return [(display(img), caption) for img, caption in session.edits]


def _inversion_summary(inv: Inversion, quality: str) -> str:
    secs = inv.stats.get("seconds") if isinstance(inv.stats, dict) else None
    took = f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""
    return (
        f"Inverted *{plain(inv.prompt)}* with **{inv.method}**, {inv.steps} steps, guidance "
        f"{inv.guidance:g}{took}. {quality} Now type a target prompt and press **Edit**."
    )


# -- handlers (module level, testable directly) ------------------------------------------------


@page_errors
def invert_image(
    ctx: AppContext,
    image: str | Path | Image.Image | None,
    caption: str,
    method: str,
    steps: float,
    guidance: float,
    session: Session | None,
    progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
) -> tuple[Image.Image, str, str, list, Session]:
    """Invert ``image`` under ``caption``; show the reconstruction and its PSNR.

    ``guidance`` is the classifier-free guidance scale the inversion is made for (null-text
    optimises its null embeddings for it); every edit of this inversion uses it.

    Returns (reconstruction, status markdown, inversion file, edits gallery, session). An
    inversion with the same key as the session's current one is reused, not recomputed.
    """
    editor = ctx.editor
    session = session or Session()
    if image is None:
        raise gr.Error("No image: upload one or pick an example first.")
    try:
        prompt = editor.check_prompt(caption or "", what="caption")
        options = InvertOptions(method=method, steps=_whole(steps, "steps"),
                                guidance=float(guidance))
        img = load_image(image)
    except (TypeError, ValueError) as exc:
        raise _fail(exc) from None
    steps, guidance = options.steps, options.guidance
    key = (image_hash(img), prompt, method, steps, guidance, editor.fingerprint)
    if session.key == key and session.inversion is not None and session.reconstruction is not None:
        inv = session.inversion
        path = _save_inversion(ctx, inv)
        status = _inversion_summary(inv, _quality(session)) + " (kept: same image, caption and settings)"
        return display(session.reconstruction), status, str(path), _gallery(session), session
    progress(0, desc="inverting")
    try:
        inv = editor.invert(img, prompt, options)
        recon = editor.reconstruct(inv)
    except ValueError as exc:
        raise _fail(exc) from None
    source = img if img.size == tuple(inv.image_size) else img.resize(
        tuple(inv.image_size), Image.Resampling.LANCZOS
    )
    new = Session(key=key, inversion=inv, source=source, reconstruction=recon, edits=[])
    path = _save_inversion(ctx, inv)
    return display(recon), _inversion_summary(inv, _quality(new)), str(path), [], new


def _quality(session: Session) -> str:
    if session.source is None or session.reconstruction is None:
        return ""
    if session.source.size != session.reconstruction.size:
        return ""
    return f"Reconstruction PSNR **{psnr(session.source, session.reconstruction):.2f} dB**."


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
    progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
) -> tuple[tuple[Image.Image, Image.Image], list, list, str, str, Session]:
    """Prompt-to-Prompt edit of the session's inversion towards ``target``.

    Returns (before/after pair, edits gallery, attention-map gallery, edited PNG path,
    status markdown, session).
    """
    editor = ctx.editor
    if session is None or session.inversion is None:
        raise gr.Error("Nothing to edit yet: invert an image first (or load an inversion file).")
    inv = session.inversion
    try:
        target = editor.check_prompt(target or "", what="target prompt")
        options = edit_options(
            cross_replace, self_replace, local_blend, blend_words, reweight, protect, leakage,
            mask_threshold,
        )
        progress(0, desc="editing")
        result = editor.edit(inv, target, options)
    except (TypeError, ValueError) as exc:
        raise _fail(exc) from None
    edited = result.image
    before = session.source if session.source is not None else getattr(result, "source", None)
    if before is None:
        before = session.reconstruction
    path = _new_file(ctx, f"edit-{slugify(target, 40)}.png")
    edited.save(path)
    edits = ([(edited, target)] + session.edits)[:MAX_EDITS]
    new = dataclasses.replace(session, edits=edits)
    maps = [
        (attention_picture(amap, before), str(word))
        for word, amap in (getattr(result, "attention_maps", None) or {}).items()
    ]
    status = f"Edited to *{plain(target)}*."
    if before is not None and before.size == edited.size:
        status += f" PSNR to the source: {psnr(before, edited):.2f} dB."
    return (display(before), display(edited)), _gallery(new), maps, str(path), status, new


def _whole(value: Any, name: str) -> int:
    """A slider's number as an integer (``50.0`` -> 50; ``50.5`` is an error)."""
    v = float(value)
    if not v.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(v)


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
    progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
) -> tuple[Session, str, str, int, float, Image.Image, str, list]:
    """Load an inversion file saved earlier; check it fits the loaded model.

    Returns (session, caption, method, steps, guidance, reconstruction, status, gallery).
    """
    if not file:
        raise gr.Error("No inversion file: choose a .safetensors file saved by this app.")
    try:
        inv = Inversion.load(file)
        inv.check_model(ctx.editor)
        recon = ctx.editor.reconstruct(inv)
    except ValueError as exc:
        raise _fail(exc) from None
    key = (inv.image_hash, inv.prompt, inv.method, int(inv.steps), float(inv.guidance),
           inv.model_fingerprint)
    new = Session(key=key, inversion=inv, source=None, reconstruction=recon, edits=[])
    status = (
        f"Loaded an inversion of *{plain(inv.prompt)}* ({inv.method}, {inv.steps} steps). "
        "Type a target prompt and press **Edit**."
    )
    return (new, inv.prompt, inv.method, int(inv.steps), float(inv.guidance), display(recon),
            status, [])


# -- the page -----------------------------------------------------------------------------------


def build_demo(
    editor: Editor,
    *,
    workdir: str | Path | None = None,
    examples_dir: str | Path | None = None,
    method: str = INVERT_DEFAULTS.method,
    steps: int = INVERT_DEFAULTS.steps,
) -> gr.Blocks:
    """The page: upload + caption -> Invert -> target prompt -> Edit, with an advanced panel.

    ``workdir`` is where downloads (edited PNGs, inversion files) are written;
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
            with gr.Column():
                image = PhotoInput(label="1. Image", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], height=300, elem_id="image")
                caption = gr.Textbox(label="Caption (describe the image)", elem_id="caption",
                                     placeholder="a red circle on a white background")
                with gr.Row():
                    method_in = gr.Dropdown(list(METHODS), value=method, label="Inversion method",
                                            elem_id="method")
                    steps_in = gr.Slider(5, 100, value=steps, step=1, label="Steps",
                                         elem_id="steps")
                    guidance = gr.Slider(1, 15, value=INVERT_DEFAULTS.guidance, step=0.5,
                                         label="Guidance",
                                         elem_id="guidance")
                invert_btn = gr.Button("Invert", variant="primary", elem_id="invert")
                examples = example_files(examples_dir)
                if examples:
                    gr.Examples([list(e) for e in examples], inputs=[image, caption],
                                label="Examples (click one: image and caption)",
                                examples_per_page=8, visible_columns=[0],
                                example_labels=[c for _, c in examples])
            with gr.Column():
                recon = gr.Image(label="Reconstruction", interactive=False, format="png",
                                 height=300, elem_id="reconstruction")
                inv_file = gr.DownloadButton("Download inversion (.safetensors)", value=None,
                                             elem_id="inversion-download")
                load_file = gr.File(label="Load an inversion file", file_types=[".safetensors"],
                                    file_count="single", elem_id="inversion-upload", height=90)
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=True):
            target = gr.Textbox(label="2. Target prompt", scale=4, elem_id="target",
                                placeholder="a blue circle on a white background")
            edit_btn = gr.Button("Edit", variant="primary", scale=1, elem_id="edit")
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
                                    max_height=400)
            with gr.Column():
                edited_file = gr.DownloadButton("Download edited PNG", value=None,
                                                elem_id="edit-download")
                gallery = gr.Gallery(label="Edits of this inversion", columns=4, height=260,
                                     format="png", elem_id="edits", object_fit="contain", fit_columns=False,
                                     preview=False)
        maps = gr.Gallery(label="Cross-attention per word (last edit; bright = attends more)",
                          columns=8, height=200, format="png", elem_id="attention", fit_columns=False,
                          object_fit="contain", preview=False)

        invert_btn.click(
            partial(invert_image, ctx), [image, caption, method_in, steps_in, guidance, session],
            [recon, status, inv_file, gallery, session], api_name="invert",
            concurrency_id=MODEL_QUEUE,
        )
        edit_inputs = [target, cross, self_, local_blend, blend, reweight, protect, leakage,
                       mask_threshold, session]
        edit_outputs = [slider, gallery, maps, edited_file, status, session]
        edit_btn.click(partial(edit_image, ctx), edit_inputs, edit_outputs, api_name="edit",
                       concurrency_id=MODEL_QUEUE)
        target.submit(partial(edit_image, ctx), edit_inputs, edit_outputs,
                      api_visibility="private", concurrency_id=MODEL_QUEUE)
        cleared = [session, status, recon, gallery, inv_file]
        image.change(invalidate, [session], cleared, api_visibility="private",
                     concurrency_limit=None, show_progress="hidden")
        caption.input(invalidate, [session], cleared, api_visibility="private",
                      concurrency_limit=None, show_progress="hidden")
        load_file.upload(
            partial(load_inversion, ctx), [load_file, session],
            [session, caption, method_in, steps_in, guidance, recon, status, gallery],
            api_name="load_inversion", concurrency_id=MODEL_QUEUE,
        )
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo
