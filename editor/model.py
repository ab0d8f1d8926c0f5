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
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from PIL import Image

# loading lives in editor.loading; these names stay importable from here
from .loading import (  # noqa: F401 - re-exported
    _DTYPES,
    BUNDLED,
    SD15,
    Loaded,
    LoadOptions,
    apply_memory_options,
    build_pipeline,
    bundled_model_path,
    check_offload,
    parse_dtype,
    resolve_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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
            h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
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
    #: plain data hashed with the weights (LoRA files and scales; :func:`weights_fingerprint`)
    fingerprint_extra: dict = field(default_factory=dict, repr=False, compare=False)
    #: where the UNet runs when CPU offload keeps the weights in main memory (else None)
    execution_device: torch.device | None = field(default=None, repr=False, compare=False)
    #: the options it was loaded with (None: built from a pipeline in memory)
    load_options: LoadOptions | None = field(default=None, repr=False, compare=False)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str = BUNDLED,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Model:
        """Load ``"shapes"`` (bundled), ``"auto"``, a hub id, a local diffusers folder or a
        ``.safetensors`` file with default load options (:meth:`load` takes them all)."""
        return cls.load(LoadOptions(model=model, device=None if device is None else str(device),
                                    dtype=None if dtype is None else str(dtype).removeprefix(
                                        "torch.")))

    @classmethod
    def load(cls, options: LoadOptions) -> Model:
        """Load what ``options`` name (:mod:`editor.loading`): the pipeline, its LoRAs, then
        the fingerprint (before offload moves weights), then the memory options."""
        dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = parse_dtype(options.dtype, dev)
        check_offload(options, dev)
        loaded: Loaded = build_pipeline(options, dev, dt)
        name = BUNDLED if loaded.location == str(bundled_model_path()) else options.model
        offload = options.offload != "none"
        self = cls.from_pipe(loaded.pipe, name, device=None if offload else dev,
                             notice="\n".join(loaded.notices) or None)
        self.fingerprint_extra = loaded.extra
        _ = self.fingerprint  # hashed now: offloaded weights are not all in one place later
        apply_memory_options(loaded.pipe, options, dev)
        if offload:
            self.execution_device = dev
        self.load_options = options
        return self

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
        for m in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None),
                  getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.requires_grad_(False).eval()
        model = cls(pipe=pipe, model_id=model_id, notice=notice)
        model._upcast_vae()
        return model

    def _upcast_vae(self) -> None:
        """SDXL's VAE overflows in float16 (its config says ``force_upcast``; diffusers'
        SDXL pipeline upcasts it around every decode): keep it in float32 for good, once,
        here (~0.3 GB more; the fingerprint hashes floats as fp16, so it does not change)."""
        vae = self.pipe.vae
        if (self.is_sdxl and vae.dtype == torch.float16
                and bool(getattr(vae.config, "force_upcast", False))):
            vae.to(torch.float32)

    # -- model facts, all read from the model's own config -------------------------------------

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:  # offloaded: the weights live on the CPU
            return self.execution_device
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def is_sdxl(self) -> bool:
        """An SDXL UNet: it takes the pooled text embedding and the size/crop ids
        (``addition_embed_type == "text_time"`` in its config)."""
        return getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def arch(self) -> str:
        """``"sdxl"`` or ``"sd"`` (SD 1.x / 2.x): recorded in inversion files."""
        return "sdxl" if self.is_sdxl else "sd"

    def _encoders(self) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs the conditioning is made of, in order."""
        pairs = [(getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "text_encoder", None))]
        if self.is_sdxl:
            pairs.append((getattr(self.pipe, "tokenizer_2", None),
                          getattr(self.pipe, "text_encoder_2", None)))
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    @property
    def text_widths(self) -> list[int]:
        """Width of each text encoder's block of the token rows (SDXL: two blocks, the
        encoders' outputs concatenated; SD: one)."""
        return [int(e.config.hidden_size) for _, e in self._encoders()]

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
        return weights_fingerprint(self.pipe, self.fingerprint_extra or None)

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

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tok = (tokenizer or self.pipe.tokenizer)(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
            return_tensors="pt",
        )
        return tok.input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        """The UNet's text conditioning of ``prompts`` (:class:`Cond`, one row per prompt).

        SD 1.x/2.x: the text encoder's last hidden states. SDXL (as diffusers'
        ``encode_prompt``): each encoder's penultimate hidden states, concatenated along the
        width, and the second encoder's projected pooled output (``text_embeds``). Token
        positions are shared by both encoders: their tokenizers are the same CLIP BPE and
        differ only in the padding token (checked per prompt,
        :func:`editor.prompts.check_aligned`)."""
        if not self.is_sdxl:
            return Cond(self.pipe.text_encoder(self.tokenize(prompts))[0].to(self.dtype))
        from .prompts import check_aligned

        pairs = self._encoders()
        if len(pairs) > 1:
            for p in prompts:
                check_aligned(pairs[0][0], pairs[-1][0], p)
        rows, pooled = [], None
        for tok, enc in pairs:
            out = enc(self.tokenize(prompts, tok), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            rows.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("this SDXL pipeline has no text encoder with a projection "
                             "(text_encoder_2): cannot make the pooled text embedding")
        return Cond(torch.cat(rows, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token rows of :meth:`encode` (B x tokens x width): the cross-attention input, the
        rows the leakage controls and text reweighting work on."""
        return self.encode(prompts).tokens

    @torch.no_grad()
    def null(self) -> Cond:
        """The unconditional branch's conditioning (1 row): the empty prompt's encoding; on
        SDXL with ``force_zeros_for_empty_prompt`` (SDXL base) zeros, as its pipeline does."""
        c = self.encode([""])
        if self.is_sdxl and bool(dict(self.pipe.config).get("force_zeros_for_empty_prompt", False)):
            c = Cond(torch.zeros_like(c.tokens), torch.zeros_like(c.pooled))
        return c

    def time_ids(self, latent_hw: tuple[int, int], rows: int) -> torch.Tensor:
        """SDXL's ``add_time_ids`` (rows x 6): original size, crop top-left, target size, as
        ``(h, w, 0, 0, h, w)`` in pixels of the working image (what is inverted and edited;
        the size micro-conditioning of diffusers' pipeline at its default)."""
        f = self.vae_scale_factor
        h, w = int(latent_hw[0]) * f, int(latent_hw[1]) * f
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(rows, -1)

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
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"the VAE decoded NaN or infinite values (VAE in {str(vae.dtype)[6:]}"
                + ("; float16 VAEs overflow, SDXL's in particular: load the model in float32 "
                   "or bfloat16, or use a VAE fixed for float16)" if vae.dtype == torch.float16
                   else ")"))
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    # -- the UNet -------------------------------------------------------------------------------

    def eps(self, x: torch.Tensor, t, emb: torch.Tensor | Cond) -> torch.Tensor:
        """One UNet call in the UNet's dtype; the prediction back in fp32. ``emb``: a
        :class:`Cond` (or, SD 1.x/2.x, the token rows alone), one row per latent; SDXL gets
        its pooled row and :meth:`time_ids` as ``added_cond_kwargs``."""
        unet = self.pipe.unet
        dt = unet.dtype
        if not self.is_sdxl:
            tokens = emb.tokens if isinstance(emb, Cond) else emb
            return unet(x.to(dt), t, encoder_hidden_states=tokens.to(dt)).sample.float()
        if not isinstance(emb, Cond) or emb.pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding: pass a Cond from "
                             "Model.encode, not token rows alone")
        added = {"text_embeds": emb.pooled.to(dt),
                 "time_ids": self.time_ids(x.shape[-2:], x.shape[0]).to(x.device, dt)}
        return unet(x.to(dt), t, encoder_hidden_states=emb.tokens.to(dt),
                    added_cond_kwargs=added).sample.float()


@dataclass
class Cond:
    """The UNet's text conditioning for rows of a batch: ``tokens`` (``... x L x D``, the
    cross-attention input; SDXL: both encoders' rows concatenated along ``D``) and, for
    SDXL, ``pooled`` (``... x P``, the ``text_embeds`` of ``added_cond_kwargs``).

    Indexing, ``expand``, ``cat`` and the dtype/device moves act on the leading (row)
    dimensions of both, so code written for token tensors carries the pooled row along.
    SDXL's size ids are not held here: :meth:`Model.time_ids` derives them from the latent.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def _map(self, fn) -> Cond:
        return Cond(fn(self.tokens), None if self.pooled is None else fn(self.pooled))

    def __getitem__(self, idx) -> Cond:
        return self._map(lambda t: t[idx])

    def __setitem__(self, idx, value: Cond) -> None:
        value = as_cond(value)
        self.tokens[idx] = value.tokens
        if self.pooled is not None:
            if value.pooled is None:
                raise ValueError("cannot assign token rows without their pooled rows")
            self.pooled[idx] = value.pooled

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The token rows' shape (what a tensor-only caller reads)."""
        return self.tokens.shape

    def float(self) -> Cond:
        return self._map(lambda t: t.float())

    def to(self, *args, **kwargs) -> Cond:
        return self._map(lambda t: t.to(*args, **kwargs))

    def cpu(self) -> Cond:
        return self._map(lambda t: t.cpu())

    def detach(self) -> Cond:
        return self._map(lambda t: t.detach())

    def clone(self) -> Cond:
        return self._map(lambda t: t.clone())

    def expand(self, rows: int) -> Cond:
        """The (1-row) conditioning repeated to ``rows`` rows, as a view."""
        return Cond(self.tokens.expand(rows, *self.tokens.shape[1:]),
                    None if self.pooled is None else self.pooled.expand(rows, *self.pooled.shape[1:]))

    @staticmethod
    def cat(conds: list[Cond | torch.Tensor], dim: int = 0) -> Cond:
        cs = [as_cond(c) for c in conds]
        pooled = None
        if any(c.pooled is not None for c in cs):
            if not all(c.pooled is not None for c in cs):
                raise ValueError("cannot join conditionings with and without pooled rows")
            pooled = torch.cat([c.pooled for c in cs], dim=dim)
        return Cond(torch.cat([c.tokens for c in cs], dim=dim), pooled)


def as_cond(x: torch.Tensor | Cond) -> Cond:
    """A :class:`Cond` (token rows alone become one without a pooled row)."""
    return x if isinstance(x, Cond) else Cond(x)
