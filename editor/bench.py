"""Benchmarks that print JSON (``pivot-edit bench ...``): speed and quality, machine stated.

``bench_inversion`` measures, on a fixed set of generator scenes, each inversion
method's reconstruction PSNR beside the VAE round-trip ceiling and its seconds, and
times a faithful port of the published null-text loop (Mokady et al. 2022 notebook
``null_text_w_ptp.ipynb``: fp32, UNet weights left requiring grad, ``.item()`` per
inner step, a batch-2 pass to advance each step) against the engine on the same image.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from . import scenes
from .images import prepare_image, psnr, to_tensor
from .inversion import METHODS, Inversion, ddim_step, invert
from .model import Editor

#: Fixed benchmark scenes: seeds far from the training range (0 .. 1e5) and from tests.
BENCH_SEEDS = (9_100_001, 9_100_002, 9_100_003, 9_100_004)


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def reference_null_text(editor: Editor, image, prompt: str, *, steps: int = 50,
                        guidance: float = 7.5, num_inner_steps: int = 10,
                        early_stop_epsilon: float | None = 1e-5) -> Inversion:
    """The published null-text loop, ported line by line (for timing and as a baseline).

    Differences from :func:`editor.inversion.null_text_optimization` are the notebook's:
    UNet weights require grad (their gradients are computed and never used), the loss is
    read with ``.item()`` every inner step, and every step ends with a batch-2 pass.
    """
    unet = editor.pipe.unet
    sched = editor.scheduler()
    sched.set_timesteps(steps)
    multiple = editor.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    img, digest = prepare_image(image, multiple=multiple, max_pixels=editor.native_size**2)
    latent = editor.encode_image(to_tensor(img)).float()
    cond = editor.encode_text([prompt]).float()
    uncond = editor.encode_text([""]).float()
    unet.requires_grad_(True)
    try:
        # DDIM inversion (notebook: ddim_loop with next_step)
        with torch.no_grad():
            all_latent = [latent]
            for i in range(steps):
                t = sched.timesteps[len(sched.timesteps) - i - 1]
                eps = unet(latent, t, encoder_hidden_states=cond).sample
                t_from = t - sched.config.num_train_timesteps // steps
                a_from = sched.alphas_cumprod[t_from] if t_from >= 0 else sched.final_alpha_cumprod
                a_t = sched.alphas_cumprod[t]
                x0 = (latent - (1 - a_from) ** 0.5 * eps) / a_from**0.5
                latent = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
                all_latent.append(latent)
        # null_optimization
        uncond_list = []
        latent_cur = all_latent[-1]
        for i in range(steps):
            uncond = uncond.clone().detach()
            uncond.requires_grad = True
            optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
            latent_prev = all_latent[len(all_latent) - i - 2]
            t = sched.timesteps[i]
            with torch.no_grad():
                noise_pred_cond = unet(latent_cur, t, encoder_hidden_states=cond).sample
            for _ in range(num_inner_steps):
                noise_pred_uncond = unet(latent_cur, t, encoder_hidden_states=uncond).sample
                noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
                latents_prev_rec = ddim_step(sched, noise_pred, int(t), latent_cur, steps)
                loss = F.mse_loss(latents_prev_rec, latent_prev)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_item = loss.item()
                if early_stop_epsilon is not None and loss_item < early_stop_epsilon + i * 2e-5:
                    break
            uncond_list.append(uncond[:1].detach())
            with torch.no_grad():
                context = torch.cat([uncond, cond])
                e = unet(torch.cat([latent_cur] * 2), t, encoder_hidden_states=context).sample
                e_u, e_c = e.chunk(2)
                latent_cur = ddim_step(sched, e_u + guidance * (e_c - e_u), int(t), latent_cur, steps)
    finally:
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)
    return Inversion(
        prompt=prompt, method="null-text", steps=steps, guidance=guidance, z_T=all_latent[-1],
        uncond=torch.cat(uncond_list).detach(), timesteps=[int(t) for t in sched.timesteps],
        image_size=img.size, model_id=editor.model_id, model_fingerprint=editor.fingerprint,
        image_hash=digest)


def bench_inversion(editor: Editor, *, steps: int = 50, guidance: float = 7.5,
                    seeds: tuple[int, ...] = BENCH_SEEDS, reference: bool = True) -> dict[str, Any]:
    """Reconstruction PSNR and seconds per method on fixed scenes, plus reference timing."""
    out: dict[str, Any] = {"model": editor.model_id, "steps": steps, "guidance": guidance,
                           "scenes": len(seeds), "machine": machine(), "methods": {}}
    items = [scenes.sample(s, n_objects=1 + k % 2) for k, s in enumerate(seeds)]
    ceil = [psnr(editor.decode_latents(editor.encode_image(to_tensor(sc.image)))[0], sc.image)
            for sc in items]
    out["vae_ceiling_psnr"] = sum(ceil) / len(ceil)
    for method in METHODS:
        vals, secs = [], []
        for sc in items:
            t0 = time.perf_counter()
            inv = invert(editor, sc.image, sc.caption, method=method, steps=steps,
                         guidance=guidance, progress=False)
            secs.append(time.perf_counter() - t0)
            vals.append(psnr(editor.reconstruct(inv, progress=False), sc.image))
        out["methods"][method] = {"psnr": sum(vals) / len(vals), "psnr_each": vals,
                                  "seconds": sum(secs) / len(secs)}
    if reference:  # same image, same settings, early stopping disabled on both
        sc = items[0]
        t0 = time.perf_counter()
        ref = reference_null_text(editor, sc.image, sc.caption, steps=steps, guidance=guidance,
                                  early_stop_epsilon=None)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng = invert(editor, sc.image, sc.caption, steps=steps, guidance=guidance,
                     early_stop_epsilon=None, progress=False)
        t_eng = time.perf_counter() - t0
        p_ref = psnr(editor.reconstruct(ref, progress=False), sc.image)
        p_eng = psnr(editor.reconstruct(eng, progress=False), sc.image)
        out["reference"] = {"reference_seconds": t_ref, "engine_seconds": t_eng,
                            "speedup": t_ref / t_eng, "reference_psnr": p_ref,
                            "engine_psnr": p_eng, "psnr_delta": p_eng - p_ref,
                            "early_stop": False}
    return out
