"""The one sampling loop: guided DDIM from an inversion, for reconstruction and editing.

:func:`denoise` walks the inversion's timesteps from ``z_T`` with classifier-free
guidance (Ho & Salimans 2022), the inversion's null embedding at every step (Mokady et
al. 2022, sec. 3) and, for direct inversion, its offsets on the source row (Ju et al.
2023). Rows of the batch are the source (row 0) and any edit targets (rows ``1..K``);
an attention controller and a local blend, when given, act inside the same loop
(:mod:`editor.editing`). :func:`reconstruct` is the loop with the source row alone.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention import AttentionController, attention_control
from .ddim import ddim_step
from .model import Cond, as_cond
from .progress import Callback, StepHook

if TYPE_CHECKING:  # pragma: no cover
    from .blending import LocalBlend
    from .inversion import Inversion
    from .model import Model


def check_timesteps(model: Model, inversion: Inversion) -> None:
    """Refuse an inversion made with other weights or another timestep schedule."""
    inversion.check_model(model)
    if model.timesteps(inversion.steps) != list(inversion.timesteps):
        raise ValueError("the model's scheduler walks other timesteps than this inversion; "
                         "invert the image again with this model")


@torch.no_grad()
def denoise(model: Model, inversion: Inversion, emb: torch.Tensor | Cond, *,
            guidance: float | None = None, controller: AttentionController | None = None,
            blend: LocalBlend | None = None, callback: Callback | None = None,
            progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Guided DDIM sampling of ``emb.shape[0]`` rows from ``inversion.z_T``; the final latents.

    Per step ``i``: the controller learns the step, the UNet runs on
    ``[null x rows, emb]``, the local blend (if any) observes the DiffEdit difference on
    the source row and blends after the DDIM update, and ``callback(i + 1, steps)`` may
    cancel (:class:`editor.progress.Cancelled`). The controller's processors are
    installed for the loop and restored in ``finally``. ``emb``: a :class:`Cond` per row
    (SD 1.x/2.x also takes the token rows alone).
    """
    check_timesteps(model, inversion)
    dev, steps = model.device, inversion.steps
    sched = model.scheduler()
    sched.set_timesteps(steps)
    w = float(inversion.guidance if guidance is None else guidance)
    rows = int(emb.shape[0])
    emb = emb.to(dev).float()
    sdxl = isinstance(emb, Cond) and emb.pooled is not None
    latents = inversion.z_T.to(dev).float().expand(rows, -1, -1, -1).clone()
    offsets = None if inversion.offsets is None else inversion.offsets.to(dev).float()
    if blend is not None:
        blend.to(dev)  # the user's masks and word weights on the latents' device
    hook = StepHook(callback, steps, "edit" if rows > 1 else "sampling")
    latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    control = (attention_control(model.unet, controller, latent_hw) if controller is not None
               else contextlib.nullcontext())
    with control:
        for i, t in enumerate(tqdm(inversion.timesteps, desc=desc, disable=not progress,
                                   leave=False)):
            if controller is not None:
                controller.set_step(i)
            if sdxl:
                null = inversion.null_at(i).to(dev).float().expand(rows)
                both = Cond.cat([null, emb])
            else:
                null = inversion.uncond_at(i).to(dev).float().expand(rows, -1, -1)
                both = torch.cat([null, as_cond(emb).tokens])
            e_u, e_c = model.eps(torch.cat([latents, latents]), t, both).chunk(2)
            if blend is not None and blend.wants_noise(i):
                # DiffEdit-style: the target prompts on the source branch's latent
                if controller is not None:
                    controller.active = False
                try:
                    e_tgt = model.eps(latents[:1].expand(rows - 1, -1, -1, -1), t, emb[1:])
                finally:
                    if controller is not None:
                        controller.active = True
                blend.observe(e_c[:1], e_tgt, i)
            latents = ddim_step(sched, e_u + w * (e_c - e_u), t, latents, steps)
            if offsets is not None:
                latents[:1] = latents[:1] + offsets[i].reshape_as(latents[:1])
            if blend is not None:
                latents = blend(latents, controller.store if controller is not None else None, i)
            hook(i + 1)
    return latents


def reconstruct(model: Model, inversion: Inversion, *, callback: Callback | None = None,
                progress: bool = True) -> Image.Image:
    """Sample back with the inversion's own prompt; null-text reproduces the input up to
    the VAE's loss (Mokady et al. 2022, sec. 3)."""
    with model.lock:
        cond = model.encode([model.check_prompt(inversion.prompt)]).float()
        latents = denoise(model, inversion, cond, callback=callback, progress=progress)
        return model.decode_latents(latents)[0]
