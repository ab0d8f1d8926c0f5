"""The :class:`Editor` facade: one loaded Stable Diffusion pipeline and the engine's verbs.

The UI, the CLI, batch runs and comparisons all call these methods; each
method delegates to the module that holds its concept (inversion, editing,
embeddings). Nothing about the last image or inversion is kept here, so one
``Editor`` can serve many users.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .editing import EditResult
    from .inversion import Inversion

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUNDLED = "shapes"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def bundled_model_path() -> Path:
    """Folder of the bundled "shapes" model (works for editable and regular installs).

    Installed, the model is the package ``editor.assets``; in a source checkout run
    without installing (``python -m editor`` from the repo root) it is ``assets/``.
    """
    try:
        path = Path(str(resources.files("editor.assets") / "shapes"))
        if path.is_dir():
            return path
    except ModuleNotFoundError:  # not installed: PYTHONPATH=<checkout> (the GPU machine)
        pass
    return Path(__file__).resolve().parents[1] / "assets" / "shapes"


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve a dtype name; refuse half precision on CPU (diffusers' CPU kernels need fp32)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
        dtype = _DTYPES[dtype.lower()]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on CPU; use --dtype float32 (or bfloat16) on CPU")
    return dtype


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(model: str) -> tuple[str, str | None]:
    """Map ``auto`` / ``shapes`` / hub id / folder to what ``from_pretrained`` takes.

    Returns ``(location, notice)``; ``notice`` is a line for the user (or None).
    """
    if not model or not isinstance(model, str):
        raise ValueError("model must be 'auto', 'shapes', a hub id or a local folder")
    if model == "auto":
        if _hub_cached(SD15) or _hub_reachable():
            return SD15, None
        return str(bundled_model_path()), (
            f"notice: {SD15} is not cached and the hub is unreachable; using the bundled "
            "'shapes' model (it only knows simple coloured shapes). Pass --model with a local "
            "SD 1.5 folder to edit real photos."
        )
    if model == BUNDLED:
        return str(bundled_model_path()), None
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ValueError(f"model folder {model!r} does not exist or is not a folder")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{model!r} is not a diffusers model folder (no model_index.json); save one with "
                "StableDiffusionPipeline.save_pretrained(...) or use --model shapes"
            )
        return str(path), None
    if model.count("/") != 1:
        raise ValueError(
            f"unknown model {model!r}: use 'auto', 'shapes', a hub id like '{SD15}' "
            "or a local diffusers folder"
        )
    return model, None


@dataclass
class Editor:
    """A loaded pipeline plus the engine's verbs (generate, invert, reconstruct, edit)."""

    pipe: StableDiffusionPipeline
    model_id: str
    notice: str | None = None
    #: Serialises use of the one UNet: an edit installs attention processors on it, so two
    #: threads (two web-app users) must not interleave an edit with another run.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str = BUNDLED,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Editor:
        """Load ``"shapes"`` (bundled), ``"auto"``, a hub id or a local diffusers folder."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = parse_dtype(dtype, dev)
        location, notice = resolve_model(model)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                location, dtype=dt, safety_checker=None, requires_safety_checker=False
            )
        except ValueError:
            raise
        except Exception as exc:  # hub / filesystem errors: one clear message
            if Path(location).is_dir():
                raise ValueError(f"could not load diffusers folder {location!r}: {exc}") from None
            raise ValueError(
                f"could not load {location!r} from the Hugging Face hub "
                f"({type(exc).__name__}). Download it once with network access, or pass a local "
                "folder (--model /path/to/sd15), or set HF_HUB_OFFLINE=1 to use the cache only, "
                "or use --model shapes for the bundled model."
            ) from None
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval()
        name = "shapes" if location == str(bundled_model_path()) else model
        return cls(pipe=pipe, model_id=name, notice=notice)

    # -- model facts, all read from the model's own config -------------------------------------

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def is_bundled(self) -> bool:
        return self.model_id == BUNDLED

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Native image side in pixels (UNet sample size times the VAE factor)."""
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def max_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the weights: configs plus a slice of weights, hashed (short hex)."""
        h = hashlib.sha256()
        for m in (self.pipe.unet, self.pipe.text_encoder, self.pipe.vae):
            cfg = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            first = next(m.parameters()).detach().flatten()[:256].float().cpu()
            h.update(first.numpy().tobytes())
        return h.hexdigest()[:16]

    def scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler from the model's own config (never the class defaults)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    # -- text ---------------------------------------------------------------------------------

    def check_prompt(self, prompt: str, *, allow_empty: bool = False, what: str = "prompt") -> str:
        """Validate a prompt: a non-empty string that fits the tokenizer's window."""
        if not isinstance(prompt, str):
            raise ValueError(f"{what} must be a string, got {type(prompt).__name__}")
        prompt = " ".join(prompt.split())
        if not prompt and not allow_empty:
            raise ValueError(f"{what} is empty; describe the image, e.g. 'a red circle on a white background'")
        n = len(self.pipe.tokenizer(prompt).input_ids)
        if n > self.max_tokens:
            raise ValueError(
                f"{what} is too long: {n} tokens, the model's text encoder takes at most "
                f"{self.max_tokens} (including start and end tokens)"
            )
        return prompt

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
            return_tensors="pt",
        )
        return tok.input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder output rows (B x tokens x width), the UNet's conditioning."""
        return self.pipe.text_encoder(self.tokenize(prompts))[0].to(self.dtype)

    # -- images and latents -------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B x 3 x H x W) to scaled latents (posterior mean)."""
        vae = self.pipe.vae
        lat = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
        return lat * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    # -- verbs ----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance: float = 7.5,
        negative_prompt: str = "",
        protect: list[str] | None = None,
        leakage: str = "none",
        height: int | None = None,
        width: int | None = None,
    ) -> Image.Image:
        """Text to image with classifier-free guidance (Ho & Salimans 2022).

        ``protect``/``leakage`` apply the leakage controls of :mod:`editor.embeddings`
        to the prompt's encoder output before sampling.
        """
        prompt = self.check_prompt(prompt)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        size = self.native_size
        emb = self.encode_text([prompt])
        if protect and leakage != "none":
            from .embeddings import protect_embeddings

            emb = protect_embeddings(self, prompt, emb, protect=protect, mode=leakage)
        neg = self.encode_text([self.check_prompt(negative_prompt, allow_empty=True)])
        gen = torch.Generator("cpu").manual_seed(int(seed))
        with self.lock:
            out = self.pipe(
                prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps,
                guidance_scale=guidance, generator=gen, height=height or size, width=width or size,
            )
        return out.images[0]

    def invert(self, image: Image.Image | str | Path, prompt: str, **kwargs: Any) -> Inversion:
        """Invert a real image under its caption; see :func:`editor.inversion.invert`."""
        from .inversion import invert

        return invert(self, image, prompt, **kwargs)

    def invert_batch(self, images: list[Image.Image | str | Path], prompts: list[str],
                     **kwargs: Any) -> list[Inversion]:
        """Several images, each under its caption, in one batched run; see
        :func:`editor.inversion.invert_batch`."""
        from .inversion import invert_batch

        return invert_batch(self, images, prompts, **kwargs)

    def reconstruct(self, inversion: Inversion, **kwargs: Any) -> Image.Image:
        """Guided sampling back from an inversion with its own prompt."""
        from .inversion import reconstruct

        return reconstruct(self, inversion, **kwargs)

    def edit(self, inversion: Inversion, target: str, **kwargs: Any) -> EditResult:
        """Prompt-to-Prompt edit of an inversion; see :func:`editor.editing.edit`."""
        from .editing import edit

        return edit(self, inversion, target, **kwargs)

    def edit_many(self, inversion: Inversion, targets: list[str], **kwargs: Any) -> list[EditResult]:
        """Several targets of one inversion in one batched run."""
        from .editing import edit_many

        return edit_many(self, inversion, targets, **kwargs)
