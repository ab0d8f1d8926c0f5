"""The loaded model and its primitives: the bottom layer of the engine.

:class:`Model` holds one diffusers Stable Diffusion pipeline and what every algorithm
needs from it: text encoding and tokenizer facts, image encoding and decoding, a fresh
DDIM scheduler from the model's own config, the UNet call, the model's fingerprint and
the lock that serialises use of the one UNet. Every size is read from the model's
config (never SD 1.5's). Nothing here knows about inversion or editing; the
:class:`editor.facade.Editor` facade ties them together.
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
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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


#: Config keys that say where or how a model was loaded, not what it is.
_NON_SEMANTIC = ("transformers_version", "torch_dtype", "dtype")
#: The pipeline components whose weights and configs make a model's identity.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _semantic_config(config) -> dict:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _NON_SEMANTIC}


def weights_fingerprint(pipe, extra: dict | None = None) -> str:
    """The fingerprint of a pipeline's weights (see :attr:`Model.fingerprint`); ``extra``
    (plain data, e.g. adapters and their scales) is hashed with them."""
    h = hashlib.sha256()
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        h.update(f"[{name}]".encode())
        h.update(json.dumps(_semantic_config(module.config), sort_keys=True, default=str).encode())
        for key, t in sorted(module.state_dict().items()):
            t = t.detach()
            h.update(f"{key}:{tuple(t.shape)}:{'f' if t.is_floating_point() else t.dtype}".encode())
            t = t.to("cpu", torch.float16) if t.is_floating_point() else t.cpu()
            h.update(memoryview(t.contiguous().view(torch.uint8).numpy()))
    sched = getattr(pipe, "scheduler", None)
    if sched is not None:
        h.update(json.dumps(_semantic_config(sched.config), sort_keys=True, default=str).encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class Model:
    """A loaded pipeline and its primitives (see the module docstring)."""

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
    ) -> Model:
        """Load ``"shapes"`` (bundled), ``"auto"``, a hub id or a local diffusers folder."""
        from diffusers import StableDiffusionPipeline

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
        name = "shapes" if location == str(bundled_model_path()) else model
        return cls.from_pipe(pipe, name, device=dev, notice=notice)

    @classmethod
    def from_pipe(cls, pipe: StableDiffusionPipeline, model_id: str, *,
                  device: str | torch.device | None = None, notice: str | None = None) -> Model:
        """Wrap an already built pipeline: DDIM scheduler from its config, progress bars off,
        weights frozen and in eval mode, moved to ``device`` (if given)."""
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(torch.device(device))
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval()
        return cls(pipe=pipe, model_id=model_id, notice=notice)

    # -- model facts, all read from the model's own config -------------------------------------

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

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
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's own
        down-sampling (so every UNet level has whole-pixel maps)."""
        return self.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    @property
    def max_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the weights, not of where they live (short hex).

        SHA-256 over every component's config (without path, version and dtype keys) and
        every tensor of its state dict: its name, shape and values, floats as fp16 bytes (so
        one checkpoint loaded in fp32 on a CPU or fp16 on a GPU is the same model). A
        byte-identical copy of a model folder has the same fingerprint; changing any weight
        changes it. Computed once per loaded model (about 2 s for SD 1.5's 1 B weights).
        """
        return weights_fingerprint(self.pipe)

    def scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler from the model's own config (never the class defaults)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    def timesteps(self, steps: int) -> list[int]:
        """The timesteps a ``steps``-step DDIM run walks, from noise to image."""
        sched = self.scheduler()
        sched.set_timesteps(steps)
        return [int(t) for t in sched.timesteps]

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

    # -- the UNet -------------------------------------------------------------------------------

    def eps(self, x: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        """One UNet call in the UNet's dtype; the prediction back in fp32."""
        unet = self.pipe.unet
        return unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample.float()
