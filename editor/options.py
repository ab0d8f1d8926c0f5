"""Every option of every verb, with its default, written once.

One frozen dataclass per verb (:class:`GenerateOptions`, :class:`InvertOptions`,
:class:`EditOptions`). Each validates itself when made (``check()``, in the style of
diffusers' ``check_inputs``: finite numbers only, ranges, integers where an integer is
meant, known names) and can be built from a plain mapping with :meth:`from_mapping`,
which refuses unknown keys and lists the valid ones. The faces map onto these and only
these: CLI flags, the web app's controls, batch-manifest keys and ``compare --config``
keys are the field names below.

Prompts are not options: whether a word is *in* a prompt is checked when the edit is
planned (:func:`editor.prompts.plan_edit`), where the tokenizer is at hand.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

#: Inversion methods (:mod:`editor.inversion`).
METHODS = ("null-text", "negative-prompt", "direct", "ddim")
#: Fast paths of null-text (:mod:`editor.fastpath`) and of the edit loop (:mod:`editor.fastedit`);
#: ``"auto"`` (the default) = CUDA graphs on CUDA, else off.
FAST_MODES = ("auto", "static-eager", "cuda-graph", "compile", "compile+cuda-graph")
#: How a target relates to the source prompt (:mod:`editor.prompts`).
EDIT_MODES = ("auto", "replace", "refine")
#: Where the local-blend mask comes from (:mod:`editor.blending`).
BLEND_MASKS = ("auto", "attention", "noise")
#: Leakage controls on the text encoding (:mod:`editor.embeddings`).
LEAKAGE_MODES = ("none", "project", "replace", "both")
#: Which self-attention maps P2P injects, by name: the largest share of the latent's
#: positions a map may have. ``"null-text"``: the null-text notebook's ``<= 32**2`` queries
#: at a 64x64 latent (1/4); ``"prompt-to-prompt"``: ``<= 16**2`` (1/16), as the
#: prompt-to-prompt_stable notebook and diffusers' Prompt2Prompt pipeline.
SELF_LAYER_RULES = {"null-text": 0.25, "prompt-to-prompt": 1 / 16}
#: Which cross-attention maps the attention blend averages: ``"published"`` (the down and
#: up blocks' maps at their coarsest size, as P2P's LocalBlend: 16x16 for SD 1.5 at 512 px)
#: or ``"half"`` (every map whose side is at least half the latent's).
BLEND_MAPS = ("published", "half")
#: How a user's mask (``edit(..., mask=...)``) combines with the automatic blend mask.
MASK_MODES = ("user", "intersect", "union")
#: Largest step count any verb accepts.
MAX_STEPS = 1000
#: Largest guidance scale accepted (finite and sane; SD is used at 1-30).
MAX_GUIDANCE = 100.0
#: Largest absolute reweight factor (P2P uses -2 .. 5; larger only makes NaNs).
MAX_REWEIGHT = 10.0

Window = float | tuple[float, float]


# -- small validators ---------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (``bool`` and ``2.5`` are not integers)."""
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


def check_number(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """A finite number in the interval ``lo..hi`` (open ends as asked)."""
    if not _is_number(v) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    x = float(v)
    bad_lo = x <= lo if lo_open else x < lo
    bad_hi = x >= hi if hi_open else x > hi
    if bad_lo or bad_hi:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {v!r}")
    return x


def check_choice(name: str, v: Any, choices: Sequence[str], what: str | None = None) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"unknown {what or name} {v!r}; use one of {', '.join(choices)}")
    return v


def check_window(name: str, v: Any) -> Window:
    """A fraction ``f`` (the steps ``[0, f)``) or a ``(start, end)`` pair of fractions."""
    if _is_number(v):
        lo, hi = 0.0, float(v)
        out: Window = float(v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v):
        lo, hi = float(v[0]), float(v[1])
        out = (lo, hi)
    else:
        raise ValueError(f"{name} must be a fraction in [0, 1] or a (start, end) pair, got {v!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1] with start <= end, got {v!r}")
    return out


def word_list(name: str, v: Any) -> tuple[str, ...]:
    """A word or phrase, or a list of them, whitespace-normalised; empty entries refused."""
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a word or a list of words, got {v!r}")
    out = []
    for w in v:
        if not isinstance(w, str):
            raise ValueError(f"{name} must hold words (strings), got {w!r}")
        w = " ".join(w.split())
        if not w:
            raise ValueError(f"{name} contains an empty word")
        out.append(w)
    return tuple(out)


class _Options:
    """Shared behaviour of the option dataclasses (``check``, mappings)."""

    #: what the verb is called in messages
    VERB: ClassVar[str] = ""

    def check(self):  # pragma: no cover - each class defines it
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, *, base=None):
        """Options from a plain mapping (manifest, config string, form); unknown keys are
        refused with the list of valid ones. ``base``: options whose values are overridden."""
        values = dict(values or {})
        unknown = [k for k in values if k not in cls.names()]
        if unknown:
            raise ValueError(
                f"unknown {cls.VERB} option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} (valid: {', '.join(cls.names())})")
        if base is not None:
            return dataclasses.replace(base, **values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready: tuples become lists)."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, Mapping):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated)."""
        return self.from_mapping(changes, base=self)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


# -- the verbs' options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateOptions(_Options):
    """Text to image (classifier-free guidance, Ho & Salimans 2022) with DDIM.

    ``protect`` + ``leakage``: a leakage control (:mod:`editor.embeddings`) on the
    prompt's encoding before sampling. ``height``/``width``: pixels (default: the model's
    native size).
    """

    VERB: ClassVar[str] = "generate"

    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    protect: tuple[str, ...] = ()
    leakage: str = "none"
    height: int | None = None
    width: int | None = None

    def check(self) -> GenerateOptions:
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("steps", self.steps, 1, MAX_STEPS)
        self._set("guidance", check_number("guidance", self.guidance, 1.0, MAX_GUIDANCE))
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        self._set("protect", word_list("protect", self.protect))
        check_choice("leakage", self.leakage, LEAKAGE_MODES, "leakage mode")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None:
                check_int(name, v, 8, 8192)
        return self


@dataclass(frozen=True)
class InvertOptions(_Options):
    """How to invert an image (:func:`editor.inversion.invert_batch`).

    - ``method``: ``null-text`` (Mokady et al. 2022), ``negative-prompt`` (Miyake et al.
      2023), ``direct`` (Ju et al. 2023) or ``ddim`` (Song et al. 2021, inverted).
    - ``steps``, ``guidance``: the DDIM steps and the guidance scale the inversion is made
      for (every edit of it samples with them).
    - ``num_inner_steps``, ``early_stop_epsilon``: null-text's Adam steps per timestep and
      its early stop (loss < epsilon + 2e-5 i; ``None``: never stop early).
    - ``max_pixels``: the working resolution's pixel budget (default: the model's native
      size squared); the image is resized to it, keeping its aspect ratio.
    - ``sync_every``, ``fast``: how the null-text loop runs (speed only; see
      :func:`editor.fastpath.resolve_sync_every` and :class:`editor.fastpath.FastPath`).
    - ``check_reconstruction``: sample the inversion back and record the reconstruction's
      PSNR against the (resized) input in ``stats`` (one more sampling pass; a warning below
      :data:`editor.facade.RECONSTRUCTION_WARNING_DB`).
    """

    VERB: ClassVar[str] = "inversion"
    #: options that change the result, hence the key of a cached inversion
    RESULT_FIELDS: ClassVar[tuple[str, ...]] = (
        "method", "steps", "guidance", "num_inner_steps", "early_stop_epsilon", "max_pixels")
    NULL_TEXT_ONLY: ClassVar[tuple[str, ...]] = ("num_inner_steps", "early_stop_epsilon")

    method: str = "null-text"
    steps: int = 50
    guidance: float = 7.5
    num_inner_steps: int = 10
    early_stop_epsilon: float | None = 1e-5
    max_pixels: int | None = None
    sync_every: int | None = None
    fast: str | None = "auto"
    check_reconstruction: bool = True

    def check(self) -> InvertOptions:
        check_choice("method", self.method, METHODS, "inversion method")
        check_int("steps", self.steps, 1, MAX_STEPS)
        self._set("guidance", check_number("guidance", self.guidance, 1.0, MAX_GUIDANCE))
        check_int("num_inner_steps", self.num_inner_steps, 1, 1000)
        if self.early_stop_epsilon is not None:
            self._set("early_stop_epsilon",
                      check_number("early_stop_epsilon", self.early_stop_epsilon, 0.0, 1.0))
        if self.max_pixels is not None:
            check_int("max_pixels", self.max_pixels, 64, 2**26)
        if self.sync_every is not None:
            check_int("sync_every", self.sync_every, 0)
        if self.fast is not None:
            check_choice("fast", self.fast, FAST_MODES, "fast mode")
        if not isinstance(self.check_reconstruction, bool):
            raise ValueError("check_reconstruction must be true or false, got "
                             f"{self.check_reconstruction!r}")
        return self

    def result_key(self) -> dict[str, Any]:
        """The options that decide the inversion's values (null-text's own ones only for
        null-text), as plain data: the cache key's ``options``."""
        out = {k: getattr(self, k) for k in self.RESULT_FIELDS}
        if self.method != "null-text":
            for k in self.NULL_TEXT_ONLY:
                out.pop(k)
        return out


@dataclass(frozen=True)
class EditOptions(_Options):
    """How to edit an inversion into a target prompt (Prompt-to-Prompt, Hertz et al. 2022).

    - ``mode``: ``replace`` (word swap, same word count), ``refine`` (words added or
      removed; token alignment), ``auto`` (by word count), chosen per target.
    - ``cross_replace``: fraction of steps (or ``(start, end)``, or a per-word mapping with
      an optional ``"default_"`` entry) during which targets take the source's
      cross-attention (steps ``int(f * (steps + 1))``, as published). ``self_replace``:
      likewise for self-attention (``int(f * steps)``), on maps of at most
      ``self_max_fraction`` of the latent's positions (a number, or a named rule of
      :data:`SELF_LAYER_RULES`).
    - ``blend_words``: ``"auto"`` (blend where the prompt change acts, see ``blend_mask``),
      words (looked up in the source and each target), or ``None`` / ``()`` for no local
      blending. ``blend_subtract``: words whose region is kept out of the mask.
    - ``blend_mask``: ``"auto"`` (``"noise"`` for ``blend_words="auto"``, else
      ``"attention"``), ``"attention"`` (P2P: the words' cross-attention maps thresholded
      at ``blend_threshold``), ``"noise"`` (DiffEdit-style prediction difference,
      thresholded at ``noise_threshold`` of its max). ``blend_maps``: which cross-attention
      maps the attention blend reads (:data:`BLEND_MAPS`). ``blend_start``: fraction of
      steps before blending starts (``int(f * steps)``). ``pixel_blend``: also composite
      the decoded images. ``mask_mode``: with a user mask (``edit(..., mask=...)``),
      ``"user"`` (it alone), ``"intersect"`` or ``"union"`` with the automatic mask.
    - ``reweight``: ``{word: scale}`` on the target's attention columns while
      cross-attention is injected; with ``reweight_text`` also on the word's share of the
      text encoding (scales clipped to [0, 1] there).
    - ``protect`` + ``leakage``: a leakage control on the target rows' text encoding.
    - ``guidance``: defaults to the inversion's.
    - ``fast``: how the sampling loop runs (speed only, as ``InvertOptions.fast``):
      ``"auto"`` (CUDA graphs on CUDA, the plain loop elsewhere), ``None`` (the plain
      loop) or a mode of :data:`FAST_MODES` (:mod:`editor.fastedit`).
    """

    VERB: ClassVar[str] = "edit"

    mode: str = "auto"
    cross_replace: Window | Mapping[str, Window] = 0.8
    self_replace: Window = 0.4
    self_max_fraction: float | str = "null-text"
    blend_words: str | tuple[str, ...] | None = "auto"
    blend_subtract: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    blend_mask: str = "auto"
    blend_maps: str = "published"
    mask_mode: str = "user"
    noise_threshold: float = 0.5
    pixel_blend: bool = True
    reweight: Mapping[str, float] = field(default_factory=dict)
    reweight_text: bool = True
    protect: tuple[str, ...] = ()
    leakage: str = "replace"
    guidance: float | None = None
    fast: str | None = "auto"

    def check(self) -> EditOptions:
        check_choice("mode", self.mode, EDIT_MODES)
        cr = self.cross_replace
        if isinstance(cr, Mapping):
            per: dict[str, Window] = {}
            for k, v in cr.items():
                if not isinstance(k, str) or not " ".join(k.split()):
                    raise ValueError(f"cross_replace keys must be words or 'default_', got {k!r}")
                what = "cross_replace" if k == "default_" else f"cross_replace[{k!r}]"
                per[k if k == "default_" else " ".join(k.split())] = check_window(what, v)
            self._set("cross_replace", per)
        else:
            self._set("cross_replace", check_window("cross_replace", cr))
        self._set("self_replace", check_window("self_replace", self.self_replace))
        if isinstance(self.self_max_fraction, str):
            check_choice("self_max_fraction", self.self_max_fraction, tuple(SELF_LAYER_RULES),
                         "self-attention rule")
        else:
            self._set("self_max_fraction",
                      check_number("self_max_fraction", self.self_max_fraction, 0.0, 1.0))
        bw = self.blend_words
        if bw is False:
            bw = None
        if bw != "auto":
            bw = word_list("blend_words", bw) or None
        self._set("blend_words", bw)
        self._set("blend_subtract", word_list("blend_subtract", self.blend_subtract))
        self._set("blend_threshold", check_number("blend_threshold", self.blend_threshold, 0.0,
                                                  1.0, hi_open=True))
        self._set("blend_start", check_number("blend_start", self.blend_start, 0.0, 1.0))
        check_choice("blend_mask", self.blend_mask, BLEND_MASKS)
        check_choice("blend_maps", self.blend_maps, BLEND_MAPS)
        check_choice("mask_mode", self.mask_mode, MASK_MODES, "mask mode")
        self._set("noise_threshold", check_number("noise_threshold", self.noise_threshold, 0.0,
                                                  1.0, hi_open=True))
        for name in ("pixel_blend", "reweight_text"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        rw = self.reweight if self.reweight is not None else {}
        if not isinstance(rw, Mapping):
            raise ValueError(f"reweight must map words to numbers, got {rw!r}")
        clean: dict[str, float] = {}
        for word, scale in rw.items():
            if not isinstance(word, str) or not " ".join(word.split()):
                raise ValueError(f"reweight keys must be words, got {word!r}")
            if not _is_number(scale) or not math.isfinite(float(scale)):
                raise ValueError(f"reweight factor for {word!r} must be a finite number, "
                                 f"got {scale!r}")
            clean[word] = check_number(f"reweight factor for {word!r}", scale, -MAX_REWEIGHT,
                                       MAX_REWEIGHT)
        self._set("reweight", clean)
        self._set("protect", word_list("protect", self.protect))
        check_choice("leakage", self.leakage, LEAKAGE_MODES, "leakage mode")
        if self.guidance is not None:
            self._set("guidance", check_number("guidance", self.guidance, 1.0, MAX_GUIDANCE))
        if self.fast is not None:
            check_choice("fast", self.fast, FAST_MODES, "fast mode")
        return self

    @property
    def self_fraction(self) -> float:
        """``self_max_fraction`` as a number (a named rule resolved)."""
        v = self.self_max_fraction
        return SELF_LAYER_RULES[v] if isinstance(v, str) else float(v)

    @property
    def blends(self) -> bool:
        """Whether local blending is on."""
        return self.blend_words == "auto" or bool(self.blend_words)

    def group_key(self) -> str:
        """Edits whose options are equal can share one batched run."""
        import json

        return json.dumps(self.to_dict(), sort_keys=True)


# -- loading a model ----------------------------------------------------------------------------

#: ``offload``: keep weights in main memory and move them to the GPU while they run
#: (:meth:`diffusers.DiffusionPipeline.enable_model_cpu_offload` one model at a time,
#: ``enable_sequential_cpu_offload`` one layer at a time).
OFFLOAD_MODES = ("none", "model", "sequential")
#: What the UNet predicts (:func:`editor.ddim.x0_eps`); ``None``: the checkpoint's own.
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Weight dtypes a model loads in.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: Largest absolute LoRA scale accepted.
MAX_LORA_SCALE = 10.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is applied with (``FILE[:SCALE]``)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"a LoRA must be a file path, got {self.path!r}")
        object.__setattr__(self, "scale", check_number(
            f"scale of LoRA {self.path!r}", self.scale, -MAX_LORA_SCALE, MAX_LORA_SCALE))

    @classmethod
    def parse(cls, text: Any) -> LoraSpec:
        """``"style.safetensors"``, ``"style.safetensors:0.8"``, a ``{"path", "scale"}``
        mapping or a ``LoraSpec``. A trailing ``:X`` is a scale only when X is a number, so
        paths with colons still work."""
        if isinstance(text, LoraSpec):
            return text
        if isinstance(text, Mapping):
            unknown = set(text) - {"path", "scale"}
            if unknown:
                raise ValueError(f"unknown LoRA keys {sorted(unknown)} (valid: path, scale)")
            return cls(text.get("path"), text.get("scale", 1.0))
        if not isinstance(text, str):
            raise ValueError(f"a LoRA must be FILE or FILE:SCALE, got {text!r}")
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError as exc:
                if "scale of LoRA" in str(exc):
                    raise
        return cls(text)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass(frozen=True)
class LoadOptions(_Options):
    """What model to load and how (:meth:`editor.facade.Editor.load`; docs/models.md).

    - ``model``: ``"shapes"`` (bundled), ``"auto"``, a hub id, a diffusers folder, or a
      single-file ``.safetensors`` checkpoint (SD 1.x, SD 2.x, SDXL base).
    - ``config``: a diffusers folder whose configs describe a single-file checkpoint's
      architecture (default: the bundled config for the detected architecture).
    - ``prediction_type``: override what the UNet predicts (SD 2.x 768-v: ``v_prediction``).
    - ``loras``: LoRA files with their scales, fused into the weights in order.
    - ``offload``: ``model`` / ``sequential`` CPU offload (a GPU with little memory).
    - ``vae_tiling`` / ``vae_slicing``: decode and encode large images tile by tile / a
      batch one image at a time (less memory, same or nearly the same pixels).
    - ``device``, ``dtype``: where and in what precision (default: CUDA if available;
      float32 on CPU, float16 on GPU).
    """

    VERB: ClassVar[str] = "load"

    model: str = "shapes"
    device: str | None = None
    dtype: str | None = None
    config: str | None = None
    prediction_type: str | None = None
    loras: tuple[LoraSpec, ...] = ()
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False

    def check(self) -> LoadOptions:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be 'auto', 'shapes', a hub id, a local folder or a "
                             ".safetensors file")
        for name in ("device", "config"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES,
                         "prediction type")
        loras = self.loras
        if isinstance(loras, (str, Mapping, LoraSpec)):
            loras = [loras]
        if not isinstance(loras, (list, tuple)):
            raise ValueError(f"loras must be a list of FILE[:SCALE], got {loras!r}")
        self._set("loras", tuple(LoraSpec.parse(x) for x in loras))
        check_choice("offload", self.offload, OFFLOAD_MODES, "offload mode")
        for name in ("vae_tiling", "vae_slicing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


#: Engines that run ``pivot-edit batch`` and ``compare`` (:mod:`editor.ray_engine`).
ENGINES = ("local", "ray")
_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}")


@dataclass(frozen=True)
class EngineOptions(_Options):
    """Where batch runs and comparisons run.

    - ``engine``: ``local`` (this process, one device) or ``ray`` (one Ray actor per worker,
      each loading the model once).
    - ``address``: the Ray cluster to join (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``);
      ``None`` starts a local Ray instance sized to this machine and stops it afterwards.
    - ``workers``: how many actors (default: the local instance's cores, or the cluster's
      GPUs / ``gpus_per_worker``, or its CPUs).
    - ``gpus_per_worker``: GPUs each actor reserves (1 for one actor per GPU; 0: CPU).
    - ``retries``: how many times an item whose worker died is run again before it is
      recorded as failed.
    """

    VERB: ClassVar[str] = "engine"
    #: the fields only the Ray engine uses
    RAY_ONLY: ClassVar[tuple[str, ...]] = ("address", "workers", "gpus_per_worker")

    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    retries: int = 2

    def check(self) -> EngineOptions:
        check_choice("engine", self.engine, ENGINES)
        if self.address is not None and (not isinstance(self.address, str) or not (
                self.address == "auto" or _ADDRESS.fullmatch(self.address))):
            raise ValueError(f"address must be 'auto', HOST:PORT or ray://HOST:PORT, got "
                             f"{self.address!r}")
        if self.workers is not None:
            check_int("workers", self.workers, 1, 100_000)
        self._set("gpus_per_worker",
                  check_number("gpus_per_worker", self.gpus_per_worker, 0.0, 64.0))
        check_int("retries", self.retries, 0, 100)
        if self.engine == "local":
            given = [k for k in self.RAY_ONLY if getattr(self, k) not in (None, 0.0)]
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ValueError(f"{flags} {'need' if len(given) > 1 else 'needs'} --engine ray")
        return self
