"""Finding and building a pipeline from what the user names (docs/models.md).

``LoadOptions.model`` is ``"shapes"`` (the bundled model), ``"auto"``, a hub id, a local
diffusers folder or a single-file ``.safetensors`` checkpoint (SD 1.x, SD 2.x, SDXL base:
the layout A1111 and ComfyUI load). A single file is loaded with diffusers'
``from_single_file`` offline, with ``config=`` one of the config folders the package ships
(``editor/assets/configs``: model_index.json and component configs, no weights) or the
user's ``--config FOLDER``. What a received file may choose is limited to data: its
tensors, and which of the two pipeline classes this module names (SD or SDXL) its keys
match. Pickle files (``.ckpt``, ``.pt``, ``.bin``, ...) are refused unopened: unpickling
runs code the file carries.

LoRA files are loaded from local ``.safetensors`` only (read here with safetensors, then
handed to diffusers' ``load_lora_weights`` as a state dict), fused into the weights
(:data:`FUSE_LORAS`), and recorded with their scales for the fingerprint. Memory options
(CPU offload, VAE tiling and slicing) are applied last, after the fingerprint is taken.

Layer 1 (below :mod:`editor.model`, which imports it): nothing here knows the engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .options import DTYPE_NAMES, LoadOptions, LoraSpec

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUNDLED = "shapes"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
#: Files that are Python pickles: opening one runs whatever code it carries.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
#: Single-file architectures: (pipeline class name, bundled config folder, description).
ARCHITECTURES = {
    "sd1": ("StableDiffusionPipeline", "sd15", "SD 1.x"),
    "sd2": ("StableDiffusionPipeline", "sd21-v", "SD 2.x"),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl-base", "SDXL base"),
}
#: The pipeline classes a config folder may name (``--config``): nothing else is built.
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: Libraries a config folder's components may come from.
COMPONENT_LIBRARIES = ("diffusers", "transformers")
#: LoRAs are fused into the weights (measured in docs/models.md: unfused LoRA layers cost
#: every UNet call an extra pair of matmuls per adapted layer; fused cost nothing).
FUSE_LORAS = True

_PICKLE_CURE = (
    "pickle files can run arbitrary code when opened, so pivot-edit never opens them. "
    "Convert it once to .safetensors with a tool you trust, in an environment you do not "
    "mind it running code in (for example: python -c \"import torch, safetensors.torch as s; "
    "sd = torch.load('IN.ckpt', weights_only=True); sd = sd.get('state_dict', sd); "
    "s.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, "
    "'OUT.safetensors')\"; weights_only=True refuses pickles that carry code), or download "
    "the .safetensors version of the model."
)


def bundled_model_path() -> Path:
    """Folder of the bundled "shapes" model (works for editable and regular installs).

    Installed, the model is the package ``editor.assets``; in a source checkout run
    without installing (``python -m editor`` from the repo root) it is ``assets/``.
    """
    return _asset("shapes")


def bundled_config_path(name: str) -> Path:
    """One of the shipped single-file config folders (``sd15``, ``sd21-v``, ``sdxl-base``)."""
    return _asset("configs") / name


def _asset(name: str) -> Path:
    try:
        path = Path(str(resources.files("editor.assets") / name))
        if path.is_dir():
            return path
    except ModuleNotFoundError:  # not installed: PYTHONPATH=<checkout> (the GPU machine)
        pass
    return Path(__file__).resolve().parents[1] / "assets" / name


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve a dtype name; refuse half precision on CPU (diffusers' CPU kernels need fp32)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
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


def refuse_pickle(path: str | Path, what: str = "model") -> None:
    """A ``ValueError`` for a pickle file (``.ckpt``, ``.pt``, ``.bin``, ...), saying why and
    how to convert it; nothing is opened."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{what} {str(path)!r} is a pickle file ({Path(path).suffix}): "
                         + _PICKLE_CURE)


def resolve_model(model: str) -> tuple[str, str | None]:
    """Map ``auto`` / ``shapes`` / hub id / folder / ``.safetensors`` file to what the
    loader takes. Returns ``(location, notice)``; ``notice`` is a line for the user (or None).
    """
    if not model or not isinstance(model, str):
        raise ValueError("model must be 'auto', 'shapes', a hub id, a local folder or a "
                         ".safetensors file")
    if model == "auto":
        if _hub_cached(SD15) or _hub_reachable():
            return SD15, None
        return str(bundled_model_path()), (
            f"notice: {SD15} is not cached and the hub is unreachable; using the bundled "
            "'shapes' model (it only knows simple coloured shapes). Pass --model with a local "
            "SD 1.5 folder or .safetensors file to edit real photos."
        )
    if model == BUNDLED:
        return str(bundled_model_path()), None
    refuse_pickle(model)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".safetensors" or (path.is_file() and not path.is_dir()):
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"model file {model!r} is not a .safetensors checkpoint; pass a "
                             "single-file .safetensors checkpoint or a diffusers folder")
        if not path.is_file():
            raise ValueError(f"model file {model!r} does not exist")
        return str(path), None
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ValueError(f"model folder {model!r} does not exist or is not a folder")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{model!r} is not a diffusers model folder (no model_index.json); save one with "
                "StableDiffusionPipeline.save_pretrained(...), pass a .safetensors file, or "
                "use --model shapes"
            )
        return str(path), None
    if model.count("/") != 1:
        raise ValueError(
            f"unknown model {model!r}: use 'auto', 'shapes', a hub id like '{SD15}', "
            "a local diffusers folder or a .safetensors file"
        )
    return model, None


# -- single-file checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class SingleFileFacts:
    """What a single-file checkpoint's header says (no tensor is read)."""

    architecture: str | None  # a key of ARCHITECTURES, or None (unknown)
    v_prediction: bool | None  # True: the file marks itself v-pred; None: it does not say
    reason: str = ""  # why the architecture is unknown


def inspect_single_file(path: str | Path) -> SingleFileFacts:
    """Read a ``.safetensors`` header (names and shapes only) and recognise SD 1.x, SD 2.x or
    SDXL base by their original-layout keys."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            ctx = f.get_slice(to_k).get_shape()[-1] if to_k in keys else None
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            in_ch = f.get_slice(conv_in).get_shape()[1] if conv_in in keys else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file ({exc})") from None
    vpred = True if "v_pred" in keys else None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        hint = ("it looks like a LoRA (pass it with --lora)" if any(
            "lora" in k for k in keys) else "it has no model.diffusion_model.* UNet tensors")
        return SingleFileFacts(None, vpred, f"not an original-layout SD checkpoint: {hint}")
    if in_ch is not None and in_ch != 4:
        return SingleFileFacts(None, vpred, f"its UNet takes {in_ch} input channels (an "
                                            "inpainting or other special model)")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return SingleFileFacts("sdxl", vpred)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return SingleFileFacts(None, vpred, "it looks like an SDXL refiner")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or ctx == 1024:
        return SingleFileFacts("sd2", vpred)
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return SingleFileFacts("sd1", vpred)
    return SingleFileFacts(None, vpred, "no text encoder it knows (cond_stage_model.* / "
                                        "conditioner.embedders.*)")


def _check_config_folder(folder: Path, what: str = "config folder") -> dict:
    """A ``--config`` (or model) folder's model_index.json, refused unless it names one of
    :data:`PIPELINE_CLASSES` and components from :data:`COMPONENT_LIBRARIES` only: a folder
    never chooses what code is imported."""
    index_file = folder / "model_index.json"
    if not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} does not exist or is not a folder")
    if not index_file.is_file():
        raise ValueError(f"{what} {str(folder)!r} has no model_index.json: pass a "
                         "diffusers model folder (its weights are not needed)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(index_file)!r} is not valid JSON ({exc})") from None
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"{what} {str(folder)!r} describes a {cls!r}; pivot-edit loads "
                         f"{' and '.join(PIPELINE_CLASSES)} models only")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if value and value[0] is not None and value[0] not in COMPONENT_LIBRARIES:
            raise ValueError(f"{what} {str(folder)!r}: component {name!r} comes from "
                             f"{value[0]!r}; only {', '.join(COMPONENT_LIBRARIES)} components "
                             "are loaded")
    return index


def _tokenizers(config: Path, index: dict) -> dict:
    """Tokenizers for a config folder without vocabulary files: the bundled model's CLIP BPE
    vocabulary with the folder's special tokens (the shipped configs carry no vocab)."""
    from transformers import CLIPTokenizer

    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        if name not in index or (config / name / "vocab.json").is_file():
            continue
        cfg_file = config / name / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        special = {k: cfg[k] for k in ("pad_token", "model_max_length") if k in cfg}
        out[name] = CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer", **special)
    return out


def choose_prediction_type(facts: SingleFileFacts, options: LoadOptions
                           ) -> tuple[str | None, str | None]:
    """``(prediction_type or None for the config's own, notice)`` for a single file: the
    user's ``--prediction-type``, else a ``v_pred`` key's word, else v-prediction for SD 2.x
    with the bundled config (768-v and 512-base cannot be told apart by their weights), said
    in a notice."""
    if options.prediction_type is not None:
        return options.prediction_type, None
    if facts.v_prediction:
        return "v_prediction", None
    if facts.architecture == "sd2" and options.config is None:
        return "v_prediction", ("notice: SD 2.x checkpoint: assuming v-prediction (SD 2.x "
                                "768-v); for a 512-pixel SD 2.x base model pass "
                                "--prediction-type epsilon")
    return None, None


def load_single_file(path: str, options: LoadOptions, dtype: torch.dtype
                     ) -> tuple[object, list[str]]:
    """Build a pipeline from a single-file checkpoint (see the module docstring).
    Returns ``(pipe, notices)``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {"StableDiffusionPipeline": StableDiffusionPipeline,
               "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
    facts = inspect_single_file(path)
    notices: list[str] = []
    if options.config is not None:
        config = Path(options.config).expanduser()
        index = _check_config_folder(config)
        cls_name, arch = index["_class_name"], "the --config folder's architecture"
    else:
        if facts.architecture is None:
            raise ValueError(
                f"unknown architecture in {path!r}: {facts.reason}. pivot-edit recognises SD 1.x, "
                "SD 2.x and SDXL base single-file checkpoints; for another architecture pass "
                "--config FOLDER, a diffusers folder of that architecture (configs only)")
        cls_name, config_name, arch = ARCHITECTURES[facts.architecture]
        config = bundled_config_path(config_name)
        index = _check_config_folder(config)
    prediction, notice = choose_prediction_type(facts, options)
    if notice:
        notices.append(notice)
    try:
        pipe = classes[cls_name].from_single_file(
            path, config=str(config), local_files_only=True, dtype=dtype,
            **_tokenizers(config, index),
            **({"safety_checker": None, "requires_safety_checker": False}
               if cls_name == "StableDiffusionPipeline" else {}))
    except Exception as exc:  # noqa: BLE001 - shape mismatches, missing keys: one message
        why = str(exc).split(" If you want")[0].strip()  # diffusers' advice does not apply
        raise ValueError(f"could not load {path!r} as {arch} ({cls_name}, config "
                         f"{str(config)!r}): {why}. If it is another architecture, pass "
                         "--config FOLDER with a diffusers folder of it") from None
    if prediction is not None:
        set_prediction_type(pipe, prediction)
    return pipe, notices


def _hub_index(repo_id: str) -> dict | None:
    """A hub repository's model_index.json (from the cache, or the hub when reachable),
    checked as a config folder's is; None when it cannot be had (the load then fails with
    the hub's message)."""
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id, "model_index.json"))
    except Exception:  # noqa: BLE001 - offline, unknown repo: the load says so
        return None
    return _check_config_folder(path.parent, f"hub model {repo_id!r}:")


def set_prediction_type(pipe, prediction_type: str) -> None:
    """Make the pipeline's scheduler config say what the UNet predicts."""
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                      prediction_type=prediction_type)


# -- LoRA -----------------------------------------------------------------------------------------


def load_lora_file(spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (``.safetensors`` only; pickles refused unopened)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle(spec.path, "LoRA")
    path = Path(spec.path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA {spec.path!r} is not a .safetensors file")
    if not path.is_file():
        raise ValueError(f"LoRA file {spec.path!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"LoRA {spec.path!r} is not a readable .safetensors file ({exc})"
                         ) from None


def apply_loras(pipe, loras: tuple[LoraSpec, ...], *, fuse: bool = FUSE_LORAS) -> list[dict]:
    """Load each LoRA as an adapter ``lora0``, ``lora1``, ... with its scale; fuse them into
    the weights and drop the adapter layers (``fuse``), or keep them active. Returns what the
    fingerprint records: per LoRA, the SHA-256 of its tensors (names, shapes, values) and
    its scale."""
    import hashlib

    if not loras:
        return []
    names, record = [], []
    for i, spec in enumerate(loras):
        sd = load_lora_file(spec)
        h = hashlib.sha256()
        for key in sorted(sd):
            t = sd[key]
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        name = f"lora{i}"
        before = _lora_param_count(pipe)
        try:
            pipe.load_lora_weights(sd, adapter_name=name)
        except ValueError as exc:
            raise ValueError(f"LoRA {spec.path!r} does not fit this model: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - shape mismatch and friends
            raise ValueError(f"LoRA {spec.path!r} does not fit this model "
                             f"({type(exc).__name__}: {exc})") from None
        if _lora_param_count(pipe) == before:
            raise ValueError(f"LoRA {spec.path!r} matched no layer of this model (is it for "
                             "another architecture?)")
        names.append(name)
        record.append({"sha256": h.hexdigest(), "scale": spec.scale})
    pipe.set_adapters(names, adapter_weights=[s.scale for s in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return record


def _lora_param_count(pipe) -> int:
    n = 0
    for name in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            n += sum(1 for k, _ in m.named_parameters() if "lora_" in k)
    return n


# -- memory options --------------------------------------------------------------------------------


def apply_memory_options(pipe, options: LoadOptions, device: torch.device) -> None:
    """VAE tiling / slicing, then CPU offload onto ``device`` (``options.offload``)."""
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)


def check_offload(options: LoadOptions, device: torch.device) -> None:
    """Offload moves weights between main memory and an accelerator: on a CPU there is
    nothing to move, so asking for it is an error that says so."""
    if options.offload != "none" and device.type == "cpu":
        raise ValueError(f"--offload {options.offload} keeps the weights in main memory and "
                         "moves them to the GPU while they run; on the CPU they are in main "
                         "memory already: drop --offload (or pass --device cuda)")


@dataclass
class Loaded:
    """A built pipeline and what the loader learned on the way."""

    pipe: object
    location: str
    notices: list[str] = field(default_factory=list)
    #: what the fingerprint adds to the weights (LoRAs and their scales, prediction type)
    extra: dict = field(default_factory=dict)


def build_pipeline(options: LoadOptions, device: torch.device, dtype: torch.dtype) -> Loaded:
    """The pipeline ``options`` name, with its LoRAs applied; not yet moved or offloaded."""
    from diffusers import StableDiffusionPipeline

    location, notice = resolve_model(options.model)
    notices = [notice] if notice else []
    if options.config is not None and not location.lower().endswith(".safetensors"):
        raise ValueError("--config describes a single-file checkpoint's architecture; it is "
                         "only used with --model FILE.safetensors")
    if location.lower().endswith(".safetensors"):
        pipe, more = load_single_file(location, options, dtype)
        notices += more
    else:
        from diffusers import StableDiffusionXLPipeline

        folder = Path(location)
        index = (_check_config_folder(folder, "model folder") if folder.is_dir()
                 else _hub_index(location))
        xl = index is not None and index.get("_class_name") == "StableDiffusionXLPipeline"
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        extra_kw = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(location, dtype=dtype, **extra_kw)
        except ValueError:
            raise
        except Exception as exc:  # hub / filesystem errors: one clear message
            if folder.is_dir():
                raise ValueError(f"could not load diffusers folder {location!r}: {exc}") from None
            raise ValueError(
                f"could not load {location!r} from the Hugging Face hub "
                f"({type(exc).__name__}). Download it once with network access, or pass a local "
                "folder (--model /path/to/sd15) or .safetensors file, or set HF_HUB_OFFLINE=1 "
                "to use the cache only, or use --model shapes for the bundled model."
            ) from None
        if options.prediction_type is not None:
            set_prediction_type(pipe, options.prediction_type)
    extra = {}
    if options.loras:
        extra["loras"] = apply_loras(pipe, options.loras)
    return Loaded(pipe=pipe, location=location, notices=notices, extra=extra)
