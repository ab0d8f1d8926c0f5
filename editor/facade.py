"""The :class:`Editor` facade: one loaded model and the engine's verbs.

The web app, the CLI, batch runs and comparisons call these methods and nothing below
them. Each verb takes its options as one dataclass (:mod:`editor.options`), checks its
inputs, takes the model's lock for every use of the UNet (an edit installs attention
processors on the one UNet, so two threads must not interleave), and delegates to the
module that holds its concept. Nothing about the last image or inversion is kept here, so
one ``Editor`` can serve many users; what it does keep is shared and per model (the
fast-path objects, whose captured CUDA graphs are reused).

    from editor import Editor, EditOptions
    ed = Editor.from_pretrained("shapes")
    inv = ed.invert("photo.png", "a red circle on a white background")
    res = ed.edit(inv, "a blue circle on a white background", EditOptions(self_replace=0.6))
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from . import editing, inversion, sampling
from .editing import EditResult
from .embeddings import protect_embeddings
from .fastpath import FastPath, resolve_fast
from .images import load_image, psnr
from .inversion import Inversion
from .model import BUNDLED, Model
from .options import EditOptions, GenerateOptions, InvertOptions, LoadOptions, LoraSpec
from .progress import Callback

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline


#: Below this reconstruction PSNR (dB, against the resized input) the model cannot represent
#: the image: edits of it will not look like it. Null-text inversions of images a model can
#: draw reach 25-37 dB (SD 1.5 photos ~27 dB on PIE-Bench; the bundled model's scenes 35 dB);
#: a photo inverted with the bundled model comes back as coloured noise (8-12 dB).
RECONSTRUCTION_WARNING_DB = 20.0


def reconstruction_warning(psnr_db: float, model: Model, method: str = "null-text") -> str | None:
    """A sentence for the user when a reconstruction is too poor to edit, naming the cure."""
    if psnr_db >= RECONSTRUCTION_WARNING_DB:
        return None
    head = (f"the reconstruction is only {psnr_db:.1f} dB from the input (below "
            f"{RECONSTRUCTION_WARNING_DB:g} dB): this model cannot represent this image, and "
            "edits of it will not look like it. ")
    if model.is_bundled:
        return head + ("The bundled 'shapes' model knows only coloured shapes on plain "
                       "backgrounds; for photos load a Stable Diffusion checkpoint "
                       "(--model FOLDER, FILE.safetensors or a hub id).")
    if method != "null-text":
        return head + f"{method} inversion reconstructs less exactly: try null-text inversion."
    return head + "Try more steps, or a model trained on images like this one."


@dataclass
class Editor:
    """A loaded :class:`~editor.model.Model` plus the verbs generate, invert, reconstruct, edit."""

    model: Model
    _fast: dict[tuple, FastPath | None] = field(default_factory=dict, repr=False, compare=False)
    _fast_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = BUNDLED, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, *, config: str | None = None,
                        prediction_type: str | None = None,
                        loras: Sequence[str | LoraSpec] = (), offload: str = "none",
                        vae_tiling: bool = False, vae_slicing: bool = False) -> Editor:
        """Load ``"shapes"`` (bundled), ``"auto"``, a hub id, a local diffusers folder or a
        single-file ``.safetensors`` checkpoint; the keywords are
        :class:`~editor.options.LoadOptions`' fields (``loras``: ``"FILE[:SCALE]"`` or
        :class:`~editor.options.LoraSpec`)."""
        return cls.load(LoadOptions(
            model=model, device=None if device is None else str(device),
            dtype=None if dtype is None else str(dtype).removeprefix("torch."), config=config,
            prediction_type=prediction_type, loras=tuple(loras), offload=offload,
            vae_tiling=vae_tiling, vae_slicing=vae_slicing))

    @classmethod
    def load(cls, options: LoadOptions) -> Editor:
        """Load the model ``options`` name (the CLI, web app, batch and compare map here)."""
        return cls(Model.load(options))

    @classmethod
    def from_pipe(cls, pipe: StableDiffusionPipeline, model_id: str, *,
                  device: str | torch.device | None = None) -> Editor:
        """An editor over a pipeline built in memory (tests, benchmarks)."""
        return cls(Model.from_pipe(pipe, model_id, device=device))

    # -- what the faces read --------------------------------------------------------------------

    @property
    def pipe(self) -> StableDiffusionPipeline:
        return self.model.pipe

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def notice(self) -> str | None:
        return self.model.notice

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def native_size(self) -> int:
        return self.model.native_size

    @property
    def is_bundled(self) -> bool:
        return self.model.is_bundled

    @property
    def is_sdxl(self) -> bool:
        return self.model.is_sdxl

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def lock(self) -> threading.RLock:
        return self.model.lock

    def check_prompt(self, prompt: str, *, allow_empty: bool = False, what: str = "prompt") -> str:
        return self.model.check_prompt(prompt, allow_empty=allow_empty, what=what)

    def fast_path(self, mode: str | None) -> FastPath | None:
        """The editor's own :class:`FastPath` for ``mode`` (``None``/``"auto"``/a mode name),
        made once per mode so that its prepared UNets and captured graphs are reused.
        An offloaded model (``offload``) moves its weights while it runs, which static buffers
        and captured graphs cannot follow: ``"auto"`` is then the plain loop, a named mode an
        error."""
        if mode is not None and self.model.execution_device is not None:
            if mode == "auto":
                return None
            raise ValueError(f"fast={mode!r} needs the UNet's weights to stay on the GPU; this "
                             "model was loaded with --offload: drop one of the two")
        key = (mode, str(self.device))
        with self._fast_lock:
            if key not in self._fast:
                self._fast[key] = resolve_fast(mode, self.device)
            return self._fast[key]

    # -- verbs ----------------------------------------------------------------------------------

    def generate(self, prompt: str, options: GenerateOptions | None = None, *,
                 generator: torch.Generator | None = None) -> Image.Image:
        """Text to image with classifier-free guidance (Ho & Salimans 2022).

        ``generator``: the noise's source (default: a CPU generator seeded with
        ``options.seed``). ``options.protect``/``leakage`` apply a leakage control
        (:mod:`editor.embeddings`) to the prompt's encoding before sampling.
        """
        o = options or GenerateOptions()
        m = self.model
        prompt = m.check_prompt(prompt)
        negative = m.check_prompt(o.negative_prompt, allow_empty=True, what="negative prompt")
        size = m.native_size
        gen = generator or torch.Generator("cpu").manual_seed(int(o.seed))
        with m.lock:
            cond = m.encode([prompt])
            emb = cond.tokens
            if o.protect and o.leakage != "none":
                emb = protect_embeddings(m, prompt, emb, protect=list(o.protect), mode=o.leakage)
            extra = {}
            if m.is_sdxl:  # SDXL: pooled rows too; an empty negative prompt is SDXL's null
                neg_c = m.null() if not negative else m.encode([negative])
                neg = neg_c.tokens
                extra = dict(pooled_prompt_embeds=cond.pooled,
                             negative_pooled_prompt_embeds=neg_c.pooled)
            else:
                neg = m.encode_text([negative])
            out = m.pipe(
                prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=o.steps,
                guidance_scale=o.guidance, generator=gen, height=o.height or size,
                width=o.width or size, **extra,
            )
        return out.images[0]

    def invert(self, image: Image.Image | str | Path, prompt: str,
               options: InvertOptions | None = None, *, callback: Callback | None = None,
               progress: bool = True) -> Inversion:
        """Invert a real image under its caption; see :func:`editor.inversion.invert_batch`."""
        return self.invert_batch([image], [prompt], options, callback=callback,
                                 progress=progress)[0]

    def invert_batch(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str],
                     options: InvertOptions | None = None, *, callback: Callback | None = None,
                     progress: bool = True) -> list[Inversion]:
        """Several images, each under its caption, in one batched run."""
        o = options or InvertOptions()
        fast = self.fast_path(o.fast) if o.method == "null-text" else None
        loaded = [load_image(im) for im in images]  # read once: invert, then check
        with self.model.lock:
            invs = inversion.invert_batch(self.model, loaded, list(prompts), o, fast=fast,
                                          callback=callback, progress=progress)
            if o.check_reconstruction:
                for img, inv in zip(loaded, invs, strict=True):
                    self.check_inversion(inv, img, progress=progress)
        for given, img, inv in zip(images, loaded, invs, strict=True):
            if isinstance(given, (str, Path)):  # a hint for edit --original, never opened by itself
                inv.source = {"path": str(Path(given).resolve()), "size": list(img.size)}
        return invs

    def check_inversion(self, inv: Inversion, image: Image.Image | str | Path, *,
                        callback: Callback | None = None, progress: bool = True
                        ) -> tuple[Image.Image, float, str | None]:
        """Sample ``inv`` back and compare it with ``image`` (the input, resized as the
        inversion resized it): ``(reconstruction, PSNR dB, warning or None)``; the PSNR and
        the warning are also recorded in ``inv.stats``."""
        m = self.model
        prepared = load_image(image)  # resized exactly as images.prepare_image resized it
        if prepared.size != tuple(inv.image_size):
            prepared = prepared.resize(tuple(inv.image_size), Image.Resampling.LANCZOS)
        recon = self.reconstruct(inv, callback=callback, progress=progress)
        value = psnr(recon, prepared)
        warning = reconstruction_warning(value, m, inv.method)
        inv.stats["reconstruction_psnr"] = round(value, 3)
        if warning:
            inv.stats["warning"] = warning
        return recon, value, warning

    def reconstruct(self, inv: Inversion, *, callback: Callback | None = None,
                    progress: bool = True) -> Image.Image:
        """Guided sampling back from an inversion with its own prompt."""
        with self.model.lock:
            return sampling.reconstruct(self.model, inv, callback=callback, progress=progress)

    def edit(self, inv: Inversion, target: str, options: EditOptions | None = None, *,
             mask=None, original=None, callback: Callback | None = None,
             progress: bool = True) -> EditResult:
        """Prompt-to-Prompt edit of an inversion; see :func:`editor.editing.edit_many`
        (``mask``: where the edit may act; ``original``: the full-size photo, for a result at
        its size)."""
        return self.edit_many(inv, [target], options, mask=mask, original=original,
                              callback=callback, progress=progress)[0]

    def edit_many(self, inv: Inversion, targets: Sequence[str],
                  options: EditOptions | None = None, *, mask=None, original=None,
                  callback: Callback | None = None, progress: bool = True) -> list[EditResult]:
        """Several targets of one inversion in one batched run (source row shared)."""
        if isinstance(targets, str):
            targets = [targets]
        mode = (options or EditOptions()).fast
        # the fast edit loop is SD 1.x/2.x only: "auto" is the eager loop for SDXL (a named
        # mode is refused by the loop, as the inversion's fast path does)
        fast = None if self.model.is_sdxl and mode == "auto" else self.fast_path(mode)
        with self.model.lock:
            return editing.edit_many(self.model, inv, list(targets), options, mask=mask,
                                     original=original, callback=callback, progress=progress,
                                     fast=fast)
