"""Inverting real images: DDIM pivots, null-text optimisation and its cheaper relatives.

- ``ddim``: DDIM inversion (Song et al. 2021, eq. 13 run backwards) with the
  conditional prediction only; sampling then uses the empty prompt as null.
- ``null-text``: Mokady et al. 2022, Algorithm 1: per timestep optimise only
  the unconditional embedding so that guided sampling retraces the pivots.
- ``negative-prompt``: Miyake et al. 2023: the source prompt's embedding is
  used as the null embedding; no optimisation.
- ``direct``: Ju et al. 2023 ("PnP Inversion"): record per step the offset
  between the pivot and the guided step; add it to the source branch only.

An :class:`Inversion` is plain data; ``save``/``load`` use safetensors for the
tensors and JSON metadata (no pickle). Sampling back from it (reconstruction and
editing) is :mod:`editor.sampling`'s one loop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from .ddim import ddim_inverse_step, ddim_step
from .fastpath import FastPath, resolve_fast, resolve_sync_every
from .fileio import atomic_write_bytes, printable
from .images import prepare_image, to_tensor
from .model import Cond, as_cond
from .options import METHODS, InvertOptions
from .progress import Callback, Cancelled, InversionCancelled, StepHook

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

__all__ = ["METHODS", "Inversion", "InversionCancelled", "Cancelled", "invert", "invert_batch",
           "ddim_pivots", "null_text_optimization", "direct_offsets"]
FORMAT = "pivot-edit/inversion"
FORMAT_VERSION = 1


@dataclass
class Inversion:
    """What editing needs to re-create (and edit) one image.

    ``uncond`` holds the null embedding per sampling step (``steps x L x D``) or
    one shared row (``1 x L x D``); ``offsets`` (direct inversion) holds one
    latent-shaped correction per step for the source branch. SDXL (``arch="sdxl"``):
    ``uncond_pooled`` holds the null's pooled row, per step (``steps x P``: null-text
    optimised it, :data:`OPTIMIZE_POOLED`) or shared (``1 x P``).
    """

    prompt: str
    method: str
    steps: int
    guidance: float
    z_T: torch.Tensor  # 1 x C x h x w, the latent at the first sampling timestep
    uncond: torch.Tensor  # (steps | 1) x L x D
    timesteps: list[int]
    image_size: tuple[int, int]  # (width, height) in pixels, as inverted
    model_id: str
    model_fingerprint: str
    image_hash: str
    offsets: torch.Tensor | None = None  # steps x C x h x w (direct only)
    stats: dict[str, Any] = field(default_factory=dict)  # seconds, losses, inner steps
    #: where the image came from, when known (``{"path": ..., "size": [w, h]}``): a hint for
    #: ``edit --original``, never a path the engine opens by itself
    source: dict[str, Any] | None = None
    uncond_pooled: torch.Tensor | None = None  # (steps | 1) x P (SDXL only)
    arch: str = "sd"  # "sd" (SD 1.x / 2.x) or "sdxl"

    def uncond_at(self, i: int) -> torch.Tensor:
        """Null embedding (1 x L x D) for sampling step ``i``."""
        return self.uncond[min(i, self.uncond.shape[0] - 1)][None]

    def null_at(self, i: int) -> Cond:
        """The null conditioning (1 row: token rows and, SDXL, the pooled row) for step ``i``."""
        pooled = None
        if self.uncond_pooled is not None:
            pooled = self.uncond_pooled[min(i, self.uncond_pooled.shape[0] - 1)][None]
        return Cond(self.uncond_at(i), pooled)

    def check_model(self, model: Model) -> None:
        """Refuse an inversion made with other weights (its null embeddings would be meaningless).
        The file's recorded model id is only a hint in the message, never loaded."""
        if self.arch != model.arch:
            names = {"sd": "an SD 1.x/2.x", "sdxl": "an SDXL"}
            raise ValueError(
                f"this inversion was made with {names.get(self.arch, self.arch)} model "
                f"({printable(self.model_id)!r}, text rows {self.uncond.shape[-1]} wide); the "
                f"loaded model {model.model_id!r} is {names[model.arch]} model (text rows "
                f"{model.pipe.unet.config.cross_attention_dim} wide). Invert the image again with "
                "this model, or load the model it was made with (--model-from-inversion).")
        if self.model_fingerprint != model.fingerprint:
            raise ValueError(
                f"this inversion was made with model {printable(self.model_id)!r} "
                f"(fingerprint {printable(self.model_fingerprint)}); the loaded model is "
                f"{model.model_id!r} ({model.fingerprint}). Invert the image again with this "
                f"model, or load the model it was made with (pass --model with it, or "
                f"--model-from-inversion to load what the file names)."
            )

    # -- file format: <name>.safetensors with JSON metadata in its header ----------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"z_T": self.z_T, "uncond": self.uncond}
        if self.offsets is not None:
            tensors["offsets"] = self.offsets
        if self.uncond_pooled is not None:
            tensors["uncond_pooled"] = self.uncond_pooled
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "prompt": self.prompt,
            "method": self.method,
            "steps": self.steps,
            "guidance": self.guidance,
            "timesteps": self.timesteps,
            "image_size": list(self.image_size),
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "image_hash": self.image_hash,
            "stats": self.stats,
        }
        if self.arch != "sd":  # SD files stay as they were; a file without "arch" is SD
            meta["arch"] = self.arch
        if self.source is not None:
            meta["source"] = self.source
        data = save_bytes(tensors, metadata={"pivot_edit": json.dumps(meta)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Read and validate an inversion file; every problem is a ``ValueError`` naming the
        file and the field (a file received from someone else is checked, never trusted)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not an inversion file")
        if not path.is_file():
            raise ValueError(f"inversion file not found: {str(path)!r}")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{str(path)!r} is {size / 2**20:.0f} MB, larger than any inversion "
                             f"({MAX_FILE_BYTES // 2**20} MB at most); not a pivot-edit inversion")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("pivot_edit")
                names = set(f.keys())
            tensors = load_file(str(path)) if raw is not None else {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{str(path)!r} is not a pivot-edit inversion file ({exc})") from None
        if raw is None:
            raise ValueError(f"{str(path)!r} is a safetensors file but not a pivot-edit inversion")
        return _from_file(cls, str(path), raw, tensors, names)


#: The largest inversion file read (SDXL at 50 steps is ~32 MB).
MAX_FILE_BYTES = 256 * 2**20
_TENSORS = {"z_T", "uncond", "offsets", "uncond_pooled"}
ARCHS = ("sd", "sdxl")


def _from_file(cls, where: str, raw: str, tensors: dict[str, torch.Tensor],
               names: set[str]) -> Inversion:
    def bad(field_: str, why: str) -> ValueError:
        return ValueError(f"{where!r}: inversion field {field_!r} {why}")

    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{where!r}: its pivot-edit metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where!r}: its pivot-edit metadata is not a JSON object")
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) \
            or not 1 <= meta["version"] <= FORMAT_VERSION:
        raise ValueError(f"{where!r}: unsupported inversion format {meta.get('format')!r} "
                         f"version {meta.get('version')!r} (this pivot-edit reads {FORMAT!r} "
                         f"version {FORMAT_VERSION})")

    def get(key: str, kind, check=None):
        if key not in meta:
            raise bad(key, "is missing")
        v = meta[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise bad(key, f"has the wrong type ({type(v).__name__})")
        if check is not None and not check(v):
            raise bad(key, f"has an impossible value {v!r}"[:300])
        return v

    def finite(lo: float, hi: float):
        return lambda v: math.isfinite(float(v)) and lo <= float(v) <= hi

    prompt = get("prompt", str, lambda v: 0 < len(v) <= 10_000 and v.strip())
    method = get("method", str, lambda v: v in METHODS)
    steps = get("steps", int, lambda v: 1 <= v <= 1000)
    guidance = float(get("guidance", (int, float), finite(1.0, 100.0)))
    timesteps = get("timesteps", list, lambda v: len(v) == steps and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 100_000 for t in v))
    image_size = get("image_size", list, lambda v: len(v) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 65_536 for s in v))
    model_id = get("model_id", str, lambda v: len(v) <= 4096)
    fingerprint = get("model_fingerprint", str, lambda v: 0 < len(v) <= 128)
    image_hash = get("image_hash", str, lambda v: 0 < len(v) <= 128)
    stats = meta.get("stats", {})
    if not isinstance(stats, dict):
        raise bad("stats", "is not an object")
    source = meta.get("source")
    if source is not None and not isinstance(source, dict):
        raise bad("source", "is not an object")
    arch = meta.get("arch", "sd")
    if arch not in ARCHS:
        raise bad("arch", f"has an unknown value {printable(arch)[:40]!r} (this pivot-edit "
                  f"knows {', '.join(ARCHS)})")

    unknown = names - _TENSORS
    if unknown:
        raise bad(sorted(unknown)[0], "is not a tensor an inversion holds")
    for key in ("z_T", "uncond"):
        if key not in tensors:
            raise bad(key, "(a tensor) is missing")
    for key, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise bad(key, f"has dtype {str(t.dtype).removeprefix('torch.')}, not a float type")
        if not bool(torch.isfinite(t).all()):
            raise bad(key, "holds NaN or infinite values")
    z, u, off = tensors["z_T"].float(), tensors["uncond"].float(), tensors.get("offsets")
    if z.dim() != 4 or z.shape[0] != 1 or min(z.shape) < 1:
        raise bad("z_T", f"has shape {tuple(z.shape)}; expected 1 x C x h x w")
    if u.dim() != 3 or u.shape[0] not in (1, steps) or min(u.shape) < 1:
        raise bad("uncond", f"has shape {tuple(u.shape)}; expected (1 or {steps}) x L x D")
    if method == "null-text" and u.shape[0] != steps:
        raise bad("uncond", f"has {u.shape[0]} rows; a null-text inversion of {steps} steps "
                  f"has {steps}")
    if (off is not None) != (method == "direct"):
        raise bad("offsets", "is present without direct inversion" if off is not None
                  else "is missing (direct inversion needs one per step)")
    if off is not None:
        off = off.float()
        if tuple(off.shape) != (steps, *z.shape):
            raise bad("offsets", f"has shape {tuple(off.shape)}; expected {(steps, *z.shape)}")
    pooled = tensors.get("uncond_pooled")
    if (pooled is not None) != (arch == "sdxl"):
        raise bad("uncond_pooled", "is missing (an SDXL inversion holds the null's pooled row)"
                  if pooled is None else "is present in a file that is not an SDXL inversion")
    if pooled is not None:
        pooled = pooled.float()
        if pooled.dim() != 2 or pooled.shape[0] not in (1, steps) or min(pooled.shape) < 1:
            raise bad("uncond_pooled", f"has shape {tuple(pooled.shape)}; expected "
                      f"(1 or {steps}) x P")
    return cls(
        prompt=prompt, method=method, steps=steps, guidance=guidance, z_T=z, uncond=u,
        uncond_pooled=pooled, arch=arch,
        timesteps=list(timesteps), image_size=(int(image_size[0]), int(image_size[1])),
        model_id=model_id, model_fingerprint=fingerprint, image_hash=image_hash,
        offsets=off, stats=stats, source=source,
    )


# -- algorithms --------------------------------------------------------------------------------


@torch.no_grad()
def ddim_pivots(model: Model, z0: torch.Tensor, cond: torch.Tensor, steps: int,
                hook=None, progress: bool = True) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prediction only (w = 1): [z*_0, ..., z*_T]."""
    sched = model.scheduler()
    sched.set_timesteps(steps)
    pivots = [z0.float()]
    z = z0.float()
    for i, t in enumerate(tqdm(sched.timesteps.flip(0).tolist(), desc="DDIM inversion",
                               disable=not progress, leave=False)):
        z = ddim_inverse_step(sched, model.eps(z, t, cond), t, z, steps)
        pivots.append(z)
        if hook:
            hook(i + 1)
    return pivots


#: SDXL null-text: also optimise the null's pooled row (``text_embeds``), not only its token
#: rows. Measured on tiny random SDXL pipelines (tests/test_sdxl.py, docs/sdxl.md).
OPTIMIZE_POOLED = True


def null_text_optimization(
    model: Model, pivots: list[torch.Tensor], cond: torch.Tensor | Cond,
    null: torch.Tensor | Cond, *, guidance: float, num_inner_steps: int,
    early_stop_epsilon: float | None, hook=None, progress: bool = True,
    sync_every: int | None = None, optimize_pooled: bool | None = None,
) -> tuple[torch.Tensor | Cond, dict]:
    """Mokady et al. 2022, Algorithm 1, batched: per timestep optimise each image's null
    embedding (fp32) so that guided DDIM from z-bar_t lands on pivot z*_{t-1}.

    Each image keeps its own Adam state and early stop (losses are summed, so gradients
    do not mix, and a stopped image's embedding is frozen), which makes a batch equal to
    inverting its images one by one. The stop decision stays on the device (the ``active``
    mask); the host reads it every ``sync_every`` inner steps (:func:`resolve_sync_every`),
    which changes speed, never the result. Returns (steps x B x L x D, stats).

    SDXL (``null`` a :class:`Cond` with a pooled row): the token rows and, with
    ``optimize_pooled`` (default :data:`OPTIMIZE_POOLED`), the pooled row are optimised
    by one Adam each step; returns a :class:`Cond` (tokens ``steps x B x L x D``, pooled
    ``steps x B x P``, or ``1 x B x P`` when the pooled row is kept).
    """
    sched = model.scheduler()
    steps = len(pivots) - 1
    sched.set_timesteps(steps)
    check_every = resolve_sync_every(sync_every, pivots[-1].device)
    # timesteps as device tensors: diffusers turns a Python int into a new device tensor
    # (a blocking host-to-device copy) on every UNet call
    t_dev = sched.timesteps.to(pivots[-1].device)
    b = cond.shape[0]
    null_c = as_cond(null)
    emb = null_c.tokens.float().expand(b, -1, -1).clone()
    pooled = None if null_c.pooled is None else null_c.pooled.float().expand(b, -1).clone()
    opt_pooled = pooled is not None and (OPTIMIZE_POOLED if optimize_pooled is None
                                         else bool(optimize_pooled))
    z = pivots[-1].float()
    out, out_pooled, inner_used, final_loss = [], [], [], []
    for i, t in enumerate(tqdm(sched.timesteps.tolist(), desc="null-text optimisation",
                               disable=not progress, leave=False)):
        target = pivots[steps - i - 1]
        with torch.no_grad():
            e_c = model.eps(z, t_dev[i], cond)  # conditional branch once per step
        emb = emb.detach().requires_grad_(True)
        params = [emb]
        if opt_pooled:
            pooled = pooled.detach().requires_grad_(True)
            params.append(pooled)
        null_i = emb if pooled is None else Cond(emb, pooled)
        opt = torch.optim.Adam(params, lr=1e-2 * (1.0 - i / 100.0))
        active = torch.ones(b, dtype=torch.bool, device=z.device)
        used = torch.zeros(b, dtype=torch.long, device=z.device)
        thr = None if early_stop_epsilon is None else early_stop_epsilon + i * 2e-5
        for j in range(num_inner_steps):
            e_u = model.eps(z, t_dev[i], null_i)
            rec = ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps)
            loss = ((rec - target) ** 2).mean(dim=(1, 2, 3))  # per image, fp32
            opt.zero_grad(set_to_none=True)
            (loss * active).sum().backward()
            before = emb.detach().clone()
            before_p = pooled.detach().clone() if opt_pooled else None
            opt.step()
            with torch.no_grad():  # stopped images keep their embedding
                emb.data = torch.where(active[:, None, None], emb.data, before)
                if opt_pooled:
                    pooled.data = torch.where(active[:, None], pooled.data, before_p)
            used += active.long()
            if thr is not None:
                active = active & (loss.detach() >= thr)
                if check_every and (j + 1) % check_every == 0 and not bool(active.any()):
                    break  # a host sync; a stopped image is masked until then
        emb = emb.detach()
        out.append(emb.clone())
        if pooled is not None:
            pooled = pooled.detach()
            out_pooled.append(pooled.clone())
        inner_used.append(used)
        with torch.no_grad():  # advance z-bar with the optimised null (not reset to the pivot)
            e_u = model.eps(z, t_dev[i], emb if pooled is None else Cond(emb, pooled))
            z = ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps)
            final_loss.append(((z - target) ** 2).mean(dim=(1, 2, 3)))
        if hook:
            hook(steps + i + 1)
    stats = {
        "inner_steps": torch.stack(inner_used, 1).tolist(),  # B x steps
        "final_mse": torch.stack(final_loss, 1).tolist(),
    }
    if pooled is None:
        return torch.stack(out, 0), stats
    return Cond(torch.stack(out, 0),
                torch.stack(out_pooled if opt_pooled else out_pooled[:1], 0)), stats


@torch.no_grad()
def direct_offsets(model: Model, pivots: list[torch.Tensor], cond: torch.Tensor | Cond,
                   null: torch.Tensor | Cond, guidance: float) -> torch.Tensor:
    """Ju et al. 2023 (PnP Inversion): offset between pivot z*_{t-1} and the guided step
    taken from the pivot z*_t, per step (steps x B x C x h x w)."""
    sched = model.scheduler()
    steps = len(pivots) - 1
    sched.set_timesteps(steps)
    offs = []
    for i, t in enumerate(sched.timesteps.tolist()):
        z = pivots[steps - i]
        e_c = model.eps(z, t, cond)
        e_u = model.eps(z, t, null.expand_as(cond) if isinstance(null, torch.Tensor)
                        else null.expand(cond.shape[0]))
        offs.append(pivots[steps - i - 1] - ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps))
    return torch.stack(offs, 0)


# -- public entry points ----------------------------------------------------------------------


def invert_batch(
    model: Model,
    images: list[Image.Image | str | Path],
    prompts: list[str],
    options: InvertOptions | None = None,
    *,
    fast: FastPath | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> list[Inversion]:
    """Invert several images, each under its own caption, in one batched run.

    1. Check the options and prompts; load, orient and resize each image to the working
       resolution (``options.max_pixels``, default the model's native size squared).
    2. Group the images by size; per group: encode, DDIM pivots, then the method's own
       step (null-text optimisation, negative-prompt null, direct offsets).
    3. Return one :class:`Inversion` per image, in input order.

    Images of the same size share UNet batches; each keeps its own null embeddings and
    early stopping, so results equal one-by-one inversion. ``callback(step, total)`` is
    called after every timestep; returning ``False`` cancels (:class:`Cancelled`).
    ``fast``: a :class:`~editor.fastpath.FastPath` for null-text's pivots and
    optimisation; ``None`` resolves ``options.fast`` (``None``: this module's loop).
    """
    o = options or InvertOptions()
    if len(images) != len(prompts) or not images:
        raise ValueError("give one prompt per image (and at least one image)")
    resolve_sync_every(o.sync_every, model.device)
    if model.is_sdxl and o.fast not in (None, "auto"):
        raise ValueError(f"fast={o.fast!r}: the fast null-text path runs SD 1.x/2.x UNets "
                         "only (not SDXL's added conditioning yet); use fast=None or 'auto'")
    if o.method != "null-text" or model.is_sdxl:
        fast = None
    elif fast is None:
        fast = resolve_fast(o.fast, model.device)
    else:
        fast.check_device(model.device)
    prompts = [model.check_prompt(p) for p in prompts]
    budget = o.max_pixels or model.native_size**2
    prepared = [prepare_image(im, multiple=model.latent_multiple, max_pixels=budget) for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (img, _) in enumerate(prepared):
        groups.setdefault(img.size, []).append(k)
    results: list[Inversion | None] = [None] * len(images)
    timesteps = model.timesteps(o.steps)
    with model.lock:
        for size, idx in groups.items():
            _invert_group(model, prepared, prompts, idx, size, results, o, timesteps=timesteps,
                          callback=callback, progress=progress, fast=fast)
    return results  # type: ignore[return-value]


def _invert_group(model: Model, prepared, prompts, idx, size, results, o: InvertOptions, *,
                  timesteps, callback, progress, fast) -> None:
    """Invert the images ``idx`` (all of one size) as one batch; fill ``results``."""
    t0 = time.perf_counter()
    steps = o.steps
    pixels = torch.cat([to_tensor(prepared[k][0]) for k in idx])
    z0 = model.encode_image(pixels).float()
    cond = model.encode([prompts[k] for k in idx]).float()
    empty = model.null().float()
    if cond.pooled is None:  # SD 1.x/2.x: token rows, as the fast path takes them
        cond, empty = cond.tokens, empty.tokens
    hook = StepHook(callback, 2 * steps if o.method == "null-text" else steps, "inversion")
    runner = None if fast is None else fast.runner(
        model, z0, cond, guidance=o.guidance, early_stop=o.early_stop_epsilon is not None)
    if runner is None:
        pivots = ddim_pivots(model, z0, cond, steps, hook, progress)
    else:
        pivots = runner.pivots(z0, cond, steps, hook=hook, progress=progress)
    t_piv = time.perf_counter() - t0
    offsets, stats = None, {}
    if o.method == "null-text":
        opts = dict(num_inner_steps=o.num_inner_steps, early_stop_epsilon=o.early_stop_epsilon,
                    hook=hook, progress=progress, sync_every=o.sync_every)
        if runner is None:
            uncond, stats = null_text_optimization(model, pivots, cond, empty,
                                                   guidance=o.guidance, **opts)
        else:
            uncond, stats = runner.null_text(pivots, cond, empty, **opts)
    elif o.method == "negative-prompt":
        uncond = cond[None]  # 1 x B x L x D: the source prompt is the null prompt
    else:
        uncond = as_cond(empty)[None]._map(lambda t: t.expand(1, len(idx), *t.shape[2:]))
        if o.method == "direct":
            offsets = direct_offsets(model, pivots, cond, empty, o.guidance)
    uncond = as_cond(uncond)
    seconds = time.perf_counter() - t0
    for j, k in enumerate(idx):
        st = {"seconds": seconds / len(idx), "pivot_seconds": t_piv / len(idx),
              "batch": len(idx)}
        if fast is not None:
            st["fast"] = fast.describe()
        if stats:
            st["inner_steps"] = stats["inner_steps"][j]
            st["final_mse"] = stats["final_mse"][j]
        results[k] = Inversion(
            prompt=prompts[k], method=o.method, steps=steps, guidance=float(o.guidance),
            z_T=pivots[-1][j : j + 1].cpu(), uncond=uncond.tokens[:, j].cpu(),
            uncond_pooled=None if uncond.pooled is None else uncond.pooled[:, j].cpu(),
            arch=model.arch, timesteps=timesteps,
            image_size=size, model_id=model.model_id, model_fingerprint=model.fingerprint,
            image_hash=prepared[k][1],
            offsets=None if offsets is None else offsets[:, j : j + 1].cpu(),
            stats=st,
        )


def invert(model: Model, image: Image.Image | str | Path, prompt: str,
           options: InvertOptions | None = None, *, fast: FastPath | None = None,
           callback: Callback | None = None, progress: bool = True) -> Inversion:
    """Invert one image under its caption (see :func:`invert_batch`)."""
    return invert_batch(model, [image], [prompt], options, fast=fast, callback=callback,
                        progress=progress)[0]
