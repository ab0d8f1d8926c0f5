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
tensors and JSON metadata (no pickle).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .images import prepare_image, to_tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import Editor

METHODS = ("null-text", "negative-prompt", "direct", "ddim")
FORMAT = "pivot-edit/inversion"
FORMAT_VERSION = 1


class InversionCancelled(RuntimeError):
    """Raised when a progress callback asks the inversion to stop."""


@dataclass
class Inversion:
    """What editing needs to re-create (and edit) one image.

    ``uncond`` holds the null embedding per sampling step (``steps x L x D``) or
    one shared row (``1 x L x D``); ``offsets`` (direct inversion) holds one
    latent-shaped correction per step for the source branch.
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

    def uncond_at(self, i: int) -> torch.Tensor:
        """Null embedding (1 x L x D) for sampling step ``i``."""
        return self.uncond[min(i, self.uncond.shape[0] - 1)][None]

    def check_model(self, editor: Editor) -> None:
        """Refuse an inversion made with other weights (its null embeddings would be meaningless)."""
        if self.model_fingerprint != editor.fingerprint:
            raise ValueError(
                f"this inversion was made with model {self.model_id!r} "
                f"(fingerprint {self.model_fingerprint}); the loaded model is "
                f"{editor.model_id!r} ({editor.fingerprint}). Invert the image again with this model."
            )

    # -- file format: <name>.safetensors with JSON metadata in its header ----------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"z_T": self.z_T, "uncond": self.uncond}
        if self.offsets is not None:
            tensors["offsets"] = self.offsets
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
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"pivot_edit": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"inversion file not found: {str(path)!r}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("pivot_edit")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is not a pivot-edit inversion file ({exc})") from None
        if raw is None:
            raise ValueError(f"{str(path)!r} is a safetensors file but not a pivot-edit inversion")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{str(path)!r}: unsupported inversion format {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        return cls(
            prompt=meta["prompt"], method=meta["method"], steps=int(meta["steps"]),
            guidance=float(meta["guidance"]), z_T=tensors["z_T"], uncond=tensors["uncond"],
            timesteps=[int(t) for t in meta["timesteps"]], image_size=tuple(meta["image_size"]),
            model_id=meta["model_id"], model_fingerprint=meta["model_fingerprint"],
            image_hash=meta["image_hash"], offsets=tensors.get("offsets"),
            stats=meta.get("stats", {}),
        )


# -- the DDIM update, on the scheduler's own alphas -------------------------------------------


def _alpha(sched, t: int) -> torch.Tensor:
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def _x0_eps(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor):
    """Model output -> (x0, eps) for the scheduler's ``prediction_type`` (SD 1.x eps, 2.x v)."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    if kind == "sample":
        return out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}")


def ddim_update(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor,
                a_prev: torch.Tensor) -> torch.Tensor:
    """DDIM step (Song et al. 2021, eq. 12, eta = 0) from alphas-cumprod ``a_t`` to ``a_prev``
    (tensors, so the fast path can keep them in buffers)."""
    x0, eps = _x0_eps(sched, out, x, a_t)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def ddim_inverse_update(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor,
                        a_from: torch.Tensor) -> torch.Tensor:
    """DDIM inversion step from alphas-cumprod ``a_from`` up to ``a_t``, the model evaluated
    at (x, t) as in the null-text paper's ``next_step``."""
    _, eps = _x0_eps(sched, out, x, a_t)
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def ddim_step(sched, out: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
    """One deterministic DDIM sampling step t -> t - T/steps (Song et al. 2021, eq. 12, eta = 0).

    Differentiable; equal to ``DDIMScheduler.step(...).prev_sample`` (tested)."""
    a_prev = _alpha(sched, t - sched.config.num_train_timesteps // steps)
    return ddim_update(sched, out, x, _alpha(sched, t), a_prev)


def ddim_inverse_step(sched, out: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM inversion step (t - T/steps) -> t, with the model evaluated at (x, t) as in the
    null-text paper's ``next_step``."""
    a_from = _alpha(sched, t - sched.config.num_train_timesteps // steps)
    return ddim_inverse_update(sched, out, x, _alpha(sched, t), a_from)


def _unet(editor: Editor, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    unet = editor.pipe.unet
    return unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample.float()


def _progress_hook(callback: Callable[[int, int], bool | None] | None, total: int):
    """Wrap a user callback ``(done, total) -> False to cancel`` as ``hook(done)``."""

    def hook(done: int) -> None:
        if callback is not None and callback(done, total) is False:
            raise InversionCancelled(f"inversion cancelled after {done} of {total} steps")

    return hook


# -- algorithms --------------------------------------------------------------------------------


@torch.no_grad()
def ddim_pivots(editor: Editor, z0: torch.Tensor, cond: torch.Tensor, steps: int,
                hook=None, progress: bool = True) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prediction only (w = 1): [z*_0, ..., z*_T]."""
    sched = editor.scheduler()
    sched.set_timesteps(steps)
    pivots = [z0.float()]
    z = z0.float()
    for i, t in enumerate(tqdm(sched.timesteps.flip(0).tolist(), desc="DDIM inversion",
                               disable=not progress, leave=False)):
        z = ddim_inverse_step(sched, _unet(editor, z, t, cond), t, z, steps)
        pivots.append(z)
        if hook:
            hook(i + 1)
    return pivots


def resolve_sync_every(sync_every: int | None, device: torch.device) -> int:
    """How often the host reads the early-stop mask: every ``k`` inner steps; 0 = never.

    ``None`` picks per device: 1 on CPU (reading a CPU tensor costs nothing, and stopping
    early skips UNet passes), 0 on CUDA. There every read drains the GPU queue while the host
    has nothing queued behind it; with 0 all inner steps run and stopped images are only
    masked (the result is the same, the saved passes are lost). Where early stopping fires
    after a few inner steps (real images), a check every 2-5 steps can be cheaper than 0;
    measure on the machine at hand.
    """
    if sync_every is None:
        return 1 if device.type == "cpu" else 0
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 0:
        raise ValueError(f"sync_every must be None or an integer >= 0, got {sync_every!r}")
    return sync_every


def null_text_optimization(
    editor: Editor, pivots: list[torch.Tensor], cond: torch.Tensor, null: torch.Tensor,
    *, guidance: float, num_inner_steps: int, early_stop_epsilon: float | None,
    hook=None, progress: bool = True, sync_every: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Mokady et al. 2022, Algorithm 1, batched: per timestep optimise each image's null
    embedding (fp32) so that guided DDIM from z-bar_t lands on pivot z*_{t-1}.

    Each image keeps its own Adam state and early stop (losses are summed, so gradients
    do not mix, and a stopped image's embedding is frozen), which makes a batch equal to
    inverting its images one by one. The stop decision stays on the device (the ``active``
    mask); the host reads it every ``sync_every`` inner steps (:func:`resolve_sync_every`),
    which changes speed, never the result. Returns (steps x B x L x D, stats).
    """
    sched = editor.scheduler()
    steps = len(pivots) - 1
    sched.set_timesteps(steps)
    check_every = resolve_sync_every(sync_every, pivots[-1].device)
    # timesteps as device tensors: diffusers turns a Python int into a new device tensor
    # (a blocking host-to-device copy) on every UNet call
    t_dev = sched.timesteps.to(pivots[-1].device)
    b = cond.shape[0]
    emb = null.float().expand(b, -1, -1).clone()
    z = pivots[-1].float()
    out, inner_used, final_loss = [], [], []
    for i, t in enumerate(tqdm(sched.timesteps.tolist(), desc="null-text optimisation",
                               disable=not progress, leave=False)):
        target = pivots[steps - i - 1]
        with torch.no_grad():
            e_c = _unet(editor, z, t_dev[i], cond)  # conditional branch once per step
        emb = emb.detach().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=1e-2 * (1.0 - i / 100.0))
        active = torch.ones(b, dtype=torch.bool, device=z.device)
        used = torch.zeros(b, dtype=torch.long, device=z.device)
        thr = None if early_stop_epsilon is None else early_stop_epsilon + i * 2e-5
        for j in range(num_inner_steps):
            e_u = _unet(editor, z, t_dev[i], emb)
            rec = ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps)
            loss = ((rec - target) ** 2).mean(dim=(1, 2, 3))  # per image, fp32
            opt.zero_grad(set_to_none=True)
            (loss * active).sum().backward()
            before = emb.detach().clone()
            opt.step()
            with torch.no_grad():  # stopped images keep their embedding
                emb.data = torch.where(active[:, None, None], emb.data, before)
            used += active.long()
            if thr is not None:
                active = active & (loss.detach() >= thr)
                if check_every and (j + 1) % check_every == 0 and not bool(active.any()):
                    break  # a host sync; a stopped image is masked until then
        emb = emb.detach()
        out.append(emb.clone())
        inner_used.append(used)
        with torch.no_grad():  # advance z-bar with the optimised null (not reset to the pivot)
            e_u = _unet(editor, z, t_dev[i], emb)
            z = ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps)
            final_loss.append(((z - target) ** 2).mean(dim=(1, 2, 3)))
        if hook:
            hook(steps + i + 1)
    stats = {
        "inner_steps": torch.stack(inner_used, 1).tolist(),  # B x steps
        "final_mse": torch.stack(final_loss, 1).tolist(),
    }
    return torch.stack(out, 0), stats


@torch.no_grad()
def direct_offsets(editor: Editor, pivots: list[torch.Tensor], cond: torch.Tensor,
                   null: torch.Tensor, guidance: float) -> torch.Tensor:
    """Ju et al. 2023 (PnP Inversion): offset between pivot z*_{t-1} and the guided step
    taken from the pivot z*_t, per step (steps x B x C x h x w)."""
    sched = editor.scheduler()
    steps = len(pivots) - 1
    sched.set_timesteps(steps)
    offs = []
    for i, t in enumerate(sched.timesteps.tolist()):
        z = pivots[steps - i]
        e_c = _unet(editor, z, t, cond)
        e_u = _unet(editor, z, t, null.expand_as(cond))
        offs.append(pivots[steps - i - 1] - ddim_step(sched, e_u + guidance * (e_c - e_u), t, z, steps))
    return torch.stack(offs, 0)


# -- public entry points ----------------------------------------------------------------------


def _check_options(method: str, steps: int, guidance: float, num_inner_steps: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise ValueError(f"steps must be an integer in 1..1000, got {steps!r}")
    if guidance < 1.0:
        raise ValueError(f"guidance must be >= 1, got {guidance}")
    if num_inner_steps < 1:
        raise ValueError("num_inner_steps must be at least 1")


def invert_batch(
    editor: Editor,
    images: list[Image.Image | str | Path],
    prompts: list[str],
    *,
    method: str = "null-text",
    steps: int = 50,
    guidance: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float | None = 1e-5,
    max_pixels: int | None = None,
    callback: Callable[[int, int], bool | None] | None = None,
    progress: bool = True,
    sync_every: int | None = None,
    fast: Any = None,
) -> list[Inversion]:
    """Invert several images, each under its own caption, in one batched run.

    Images that resize to the same shape share UNet batches; each keeps its own null
    embeddings and early stopping, so results equal one-by-one inversion.
    ``callback(step, total)`` is called after every timestep; returning ``False`` cancels
    (raises :class:`InversionCancelled`). ``sync_every``: see :func:`resolve_sync_every`.
    ``fast``: ``None`` (this module's loop), ``"auto"``, a mode name or a
    :class:`editor.fastpath.FastPath` for null-text's pivots and optimisation (static
    buffers, CUDA graphs / torch.compile, reduced-precision UNet; see that module).
    """
    from .fastpath import resolve_fast

    if len(images) != len(prompts) or not images:
        raise ValueError("give one prompt per image (and at least one image)")
    _check_options(method, steps, guidance, num_inner_steps)
    resolve_sync_every(sync_every, editor.device)
    fast = resolve_fast(fast, editor.device) if method == "null-text" else None
    prompts = [editor.check_prompt(p) for p in prompts]
    multiple = editor.vae_scale_factor * 2 ** (len(editor.pipe.unet.config.block_out_channels) - 1)
    budget = max_pixels or editor.native_size**2
    prepared = [prepare_image(im, multiple=multiple, max_pixels=budget) for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (img, _) in enumerate(prepared):
        groups.setdefault(img.size, []).append(k)
    results: list[Inversion | None] = [None] * len(images)
    sched = editor.scheduler()
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    with editor.lock:
        for size, idx in groups.items():
            _invert_group(editor, prepared, prompts, idx, size, results, method=method,
                          steps=steps, guidance=guidance, num_inner_steps=num_inner_steps,
                          early_stop_epsilon=early_stop_epsilon, timesteps=timesteps,
                          callback=callback, progress=progress, sync_every=sync_every,
                          fast=fast)
    return results  # type: ignore[return-value]


def _invert_group(editor: Editor, prepared, prompts, idx, size, results, *, method, steps,
                  guidance, num_inner_steps, early_stop_epsilon, timesteps, callback, progress,
                  sync_every, fast) -> None:
    """Invert the images ``idx`` (all of one size) as one batch; fill ``results``."""
    t0 = time.perf_counter()
    pixels = torch.cat([to_tensor(prepared[k][0]) for k in idx])
    z0 = editor.encode_image(pixels).float()
    cond = editor.encode_text([prompts[k] for k in idx]).float()
    empty = editor.encode_text([""]).float()
    hook = _progress_hook(callback, 2 * steps if method == "null-text" else steps)
    runner = None if fast is None else fast.runner(
        editor, z0, cond, guidance=guidance, early_stop=early_stop_epsilon is not None)
    if runner is None:
        pivots = ddim_pivots(editor, z0, cond, steps, hook, progress)
    else:
        pivots = runner.pivots(z0, cond, steps, hook=hook, progress=progress)
    t_piv = time.perf_counter() - t0
    offsets, stats = None, {}
    if method == "null-text":
        opts = dict(num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon,
                    hook=hook, progress=progress, sync_every=sync_every)
        if runner is None:
            uncond, stats = null_text_optimization(editor, pivots, cond, empty,
                                                   guidance=guidance, **opts)
        else:
            uncond, stats = runner.null_text(pivots, cond, empty, **opts)
    elif method == "negative-prompt":
        uncond = cond[None]  # 1 x B x L x D: the source prompt is the null prompt
    else:
        uncond = empty[None].expand(1, len(idx), -1, -1)
        if method == "direct":
            offsets = direct_offsets(editor, pivots, cond, empty, guidance)
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
            prompt=prompts[k], method=method, steps=steps, guidance=float(guidance),
            z_T=pivots[-1][j : j + 1].cpu(), uncond=uncond[:, j].cpu(), timesteps=timesteps,
            image_size=size, model_id=editor.model_id, model_fingerprint=editor.fingerprint,
            image_hash=prepared[k][1],
            offsets=None if offsets is None else offsets[:, j : j + 1].cpu(),
            stats=st,
        )


def invert(editor: Editor, image: Image.Image | str | Path, prompt: str, **kwargs: Any) -> Inversion:
    """Invert one image under its caption (see :func:`invert_batch` for the options)."""
    return invert_batch(editor, [image], [prompt], **kwargs)[0]


@torch.no_grad()
def sample(editor: Editor, inversion: Inversion, cond: torch.Tensor | None = None,
           *, progress: bool = True) -> torch.Tensor:
    """Guided DDIM sampling from ``inversion.z_T`` with its per-step null embeddings
    (and offsets, for direct inversion). Returns the final latent."""
    inversion.check_model(editor)
    sched = editor.scheduler()
    sched.set_timesteps(inversion.steps)
    if [int(t) for t in sched.timesteps] != inversion.timesteps:
        raise ValueError("the model's scheduler walks other timesteps than this inversion")
    if cond is None:
        cond = editor.encode_text([inversion.prompt]).float()
    z = inversion.z_T.to(editor.device).float()
    w = inversion.guidance
    for i, t in enumerate(tqdm(inversion.timesteps, desc="sampling", disable=not progress,
                               leave=False)):
        null = inversion.uncond_at(i).to(editor.device).float()
        e = _unet(editor, torch.cat([z, z]), t, torch.cat([null, cond]))
        e_u, e_c = e.chunk(2)
        z = ddim_step(sched, e_u + w * (e_c - e_u), t, z, inversion.steps)
        if inversion.offsets is not None:
            z = z + inversion.offsets[i].to(z.device)
    return z


def reconstruct(editor: Editor, inversion: Inversion, *, progress: bool = True) -> Image.Image:
    """Sample back with the inversion's own prompt; null-text reproduces the input up to
    the VAE's loss (Mokady et al. 2022, Sec. 3)."""
    with editor.lock:
        return editor.decode_latents(sample(editor, inversion, progress=progress))[0]
