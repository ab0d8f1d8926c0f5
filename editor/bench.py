"""Benchmarks that print JSON (``pivot-edit bench ...``): speed and quality, machine stated.

``bench_inversion`` measures, on a fixed set of generator scenes, each inversion
method's reconstruction PSNR beside the VAE round-trip ceiling and its seconds, and
times a faithful port of the published null-text loop (Mokady et al. 2022 notebook
``null_text_w_ptp.ipynb``: fp32, UNet weights left requiring grad, ``.item()`` per
inner step, a batch-2 pass to advance each step) against the engine on the same image.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes
from .ddim import ddim_step
from .facade import Editor
from .images import prepare_image, psnr, to_tensor
from .inversion import METHODS, Inversion
from .options import InvertOptions

#: Fixed benchmark scenes: seeds far from the training range (0 .. 1e5) and from tests.
BENCH_SEEDS = (9_100_001, 9_100_002, 9_100_003, 9_100_004)


def machine() -> dict[str, str | int | None]:
    """Where a benchmark ran: OS, Python, torch, CPU count, torch threads and accelerator."""
    info: dict[str, str | int | None] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def vae_ceiling(editor: Editor, images: list) -> list[float]:
    """PSNR of each image through the VAE alone: the ceiling of every reconstruction."""
    m = editor.model
    return [psnr(m.decode_latents(m.encode_image(to_tensor(im)))[0], im) for im in images]


def reference_null_text(editor: Editor, image, prompt: str, *, steps: int = 50,
                        guidance: float = 7.5, num_inner_steps: int = 10,
                        early_stop_epsilon: float | None = 1e-5) -> Inversion:
    """The published null-text loop, ported line by line (for timing and as a baseline).

    Differences from :func:`editor.inversion.null_text_optimization` are the notebook's:
    UNet weights require grad (their gradients are computed and never used), the loss is
    read with ``.item()`` every inner step, and every step ends with a batch-2 pass.
    """
    m = editor.model
    unet = m.unet
    sched = m.scheduler()
    sched.set_timesteps(steps)
    img, digest = prepare_image(image, multiple=m.latent_multiple, max_pixels=m.native_size**2)
    latent = m.encode_image(to_tensor(img)).float()
    cond = m.encode_text([prompt]).float()
    uncond = m.encode_text([""]).float()
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
                    seeds: tuple[int, ...] = BENCH_SEEDS, reference: bool = True,
                    methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Reconstruction PSNR and seconds per method on fixed scenes, plus reference timing."""
    out: dict[str, Any] = {"model": editor.model_id, "steps": steps, "guidance": guidance,
                           "scenes": len(seeds), "machine": machine(), "methods": {}}
    items = [scenes.sample(s, n_objects=1 + k % 2) for k, s in enumerate(seeds)]
    ceil = vae_ceiling(editor, [sc.image for sc in items])
    out["vae_ceiling_psnr"] = sum(ceil) / len(ceil)
    for method in methods:
        vals, secs = [], []
        for sc in items:
            t0 = time.perf_counter()
            inv = editor.invert(sc.image, sc.caption,
                                InvertOptions(method=method, steps=steps, guidance=guidance),
                                progress=False)
            secs.append(time.perf_counter() - t0)
            vals.append(psnr(editor.reconstruct(inv, progress=False), sc.image))
        out["methods"][method] = {"psnr": sum(vals) / len(vals), "psnr_each": vals,
                                  "seconds": sum(secs) / len(secs)}
    if reference:  # same image, same settings, early stopping disabled on both
        sc = items[0]
        kw = dict(steps=steps, guidance=guidance, early_stop_epsilon=None)
        opts = InvertOptions(**kw)
        runs = {"reference": [], "engine": []}
        results = {}
        # A-B-B-A order, so a machine whose load drifts during the run biases neither side
        for who in ("reference", "engine", "engine", "reference"):
            t0 = time.perf_counter()
            if who == "reference":
                results[who] = reference_null_text(editor, sc.image, sc.caption, **kw)
            else:
                results[who] = editor.invert(sc.image, sc.caption, opts, progress=False)
            runs[who].append(time.perf_counter() - t0)
        t_ref, t_eng = sum(runs["reference"]) / 2, sum(runs["engine"]) / 2
        p_ref = psnr(editor.reconstruct(results["reference"], progress=False), sc.image)
        p_eng = psnr(editor.reconstruct(results["engine"], progress=False), sc.image)
        out["reference"] = {"reference_seconds": t_ref, "engine_seconds": t_eng,
                            "runs": runs, "order": "ABBA", "speedup": t_ref / t_eng,
                            "reference_psnr": p_ref, "engine_psnr": p_eng,
                            "psnr_delta": p_eng - p_ref, "early_stop": False}
    return out


# -- null-text early stopping (``pivot-edit bench early-stop``) ------------------------------


def inner_passes(used: list[list[int]], num_inner_steps: int, check_every: int) -> list[int]:
    """UNet passes the inner loop ran per timestep, from the per-image counts of active steps
    (``stats["inner_steps"]``, images x steps) and how often the host checked the stop mask.

    Images only ever stop (never restart) within a timestep, so the batch's last image stops
    after ``max(used)`` steps; the host sees it at the next multiple of ``check_every`` (``0``:
    never, every inner step runs). This is the loop's own rule
    (:func:`editor.inversion.null_text_optimization`)."""
    n = num_inner_steps
    out = []
    for col in zip(*used, strict=True):
        last = max(col)
        out.append(n if check_every == 0 else min(n, -(-last // check_every) * check_every))
    return out


#: Scenes for the early-stop measurement: the four benchmark scenes and four more (seeds far
#: from the training range and the tests).
EARLY_STOP_SEEDS = BENCH_SEEDS + (9_100_005, 9_100_006, 9_100_007, 9_100_008)


def bench_early_stop(editor: Editor, *, steps: int = 50, guidance: float = 7.5,
                     num_inner_steps: int = 10, epsilon: float = 1e-5,
                     seeds: tuple[int, ...] = EARLY_STOP_SEEDS, batch: int = 1,
                     check_every: tuple[int, ...] = (1, 2, 5, 0)) -> dict[str, Any]:
    """What null-text's early stop saves on real-looking inputs (the model's own scenes; a
    random-weight model never stops early), and what it costs in reconstruction.

    Runs: ``off`` (every inner step, no early stop) and, with the stop (loss < eps + 2e-5 i,
    Mokady et al.), one run per host check interval ``k`` in ``check_every`` (``1``: the
    published loop's check after every inner step; ``0``: never: stopped images are masked on
    the device and all inner steps run). ``k`` changes speed, never the result (tested), so
    the stopped runs share one reconstruction PSNR. Per run: seconds per image, inner steps
    that updated an embedding (``used``) and UNet passes the inner loop ran (``passes``),
    both per image and timestep, and the reconstruction PSNR against the input."""
    from .inversion import invert_batch

    items = [scenes.sample(s, n_objects=1 + k % 2, size=editor.native_size)
             for k, s in enumerate(seeds)]
    imgs, caps = [sc.image for sc in items], [sc.caption for sc in items]
    groups = [list(range(i, min(i + batch, len(items)))) for i in range(0, len(items), batch)]
    out: dict[str, Any] = {"model": editor.model_id, "steps": steps, "guidance": guidance,
                           "num_inner_steps": num_inner_steps, "epsilon": epsilon,
                           "scenes": len(items), "batch": batch, "machine": machine(),
                           "vae_ceiling_psnr": float(np.mean(vae_ceiling(editor, imgs))),
                           "runs": {}}
    runs = [("off", None, 0)] + [(f"stop-k{k}", epsilon, k) for k in check_every]
    psnr_of: dict[Any, list[float]] = {}
    invert_batch(editor.model, imgs[:1], caps[:1], InvertOptions(  # warm-up, not timed
        steps=2, num_inner_steps=1, check_reconstruction=False), progress=False)
    secs: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    # every run twice, the second pass in reverse order (A-B-..-B-A): load drift on a shared
    # machine biases no run
    for name, eps, k in runs + runs[::-1]:
        opts = InvertOptions(steps=steps, guidance=guidance, num_inner_steps=num_inner_steps,
                             early_stop_epsilon=eps, sync_every=k, check_reconstruction=False)
        sec, used, passes, invs = 0.0, [], [], []
        for g in groups:
            t0 = time.perf_counter()
            got = invert_batch(editor.model, [imgs[i] for i in g], [caps[i] for i in g], opts,
                               progress=False)
            sec += time.perf_counter() - t0
            u = [inv.stats["inner_steps"] for inv in got]
            used += [sum(x) / steps for x in u]
            passes.append(sum(inner_passes(u, num_inner_steps, k)) / steps)
            invs += got
        secs[name].append(sec / len(items))
        if eps not in psnr_of:
            psnr_of[eps] = [psnr(editor.reconstruct(inv, progress=False), im)
                            for inv, im in zip(invs, imgs, strict=True)]
        vals = psnr_of[eps]
        out["runs"][name] = {
            "early_stop_epsilon": eps, "check_every": k,
            "seconds_per_image": float(np.mean(secs[name])), "seconds_each_pass": secs[name],
            "used_per_timestep": float(np.mean(used)),
            "passes_per_timestep": float(np.mean(passes)),
            "psnr": float(np.mean(vals)), "psnr_each": vals}
    base = out["runs"]["off"]
    for r in out["runs"].values():
        r["seconds_saved"] = 1 - r["seconds_per_image"] / base["seconds_per_image"]
        r["passes_saved"] = 1 - r["passes_per_timestep"] / base["passes_per_timestep"]
        r["psnr_delta_db"] = r["psnr"] - base["psnr"]
    return out


# -- GPU speed at Stable Diffusion 1.5 size (``pivot-edit bench gpu``) -------------------------

#: SD 1.5's UNet (859.5 M parameters).
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
#: SD's VAE: 8x down-sampling, 4 latent channels.
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215,
)
#: CLIP ViT-L/14's text encoder: width 768, 12 layers, 77 tokens.
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768,
)
#: ``--cpu-smoke``: the same architectures shrunk to run in seconds on a CPU (128x128
#: images, a 64-wide text encoder).
SMOKE_UNET = dict(block_out_channels=(32, 32, 64, 64), sample_size=16, norm_num_groups=32,
                  cross_attention_dim=64)
SMOKE_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                 sample_size=128)
SMOKE_TEXT = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, projection_dim=64)

#: The speed targets (H100/H200, SD 1.5 shape, 512x512, 50 steps, 10 inner steps, no early stop).
GPU_TARGETS = {"nti_seconds_per_image_batch1": 8.0, "nti_seconds_per_image_batch8": 2.5,
               "p2p_edit_seconds": 2.0, "p2p_edit_4_targets_seconds": 4.0,
               "reconstruction_delta_db": -0.3}
#: Variants of ``bench gpu``: name -> (UNet dtype, fast mode or None for the plain loop,
#: channels-last). The embedding, Adam and the loss are fp32 in all of them.
GPU_VARIANTS: dict[str, tuple[torch.dtype, str | None, bool]] = {
    "eager-fp32": (torch.float32, None, False),
    "static-eager-fp32": (torch.float32, "static-eager", False),
    "cuda-graph-fp32": (torch.float32, "cuda-graph", False),
    "eager-bf16": (torch.bfloat16, None, False),
    "static-eager-bf16": (torch.bfloat16, "static-eager", False),
    "cuda-graph-bf16": (torch.bfloat16, "cuda-graph", False),
    "cuda-graph-bf16-cl": (torch.bfloat16, "cuda-graph", True),
    "compile-bf16": (torch.bfloat16, "compile", False),
    "compile+cuda-graph-bf16": (torch.bfloat16, "compile+cuda-graph", False),
    "cuda-graph-fp16": (torch.float16, "cuda-graph", False),
}
DEFAULT_GPU_VARIANTS = ("eager-fp32", "static-eager-fp32", "cuda-graph-fp32", "eager-bf16",
                        "static-eager-bf16", "cuda-graph-bf16", "cuda-graph-bf16-cl",
                        "cuda-graph-fp16")
#: The variant whose early-stop host checks are timed (CUDA, CPU) and the intervals.
SYNC_VARIANT = {True: "cuda-graph-bf16", False: "static-eager-bf16"}
SYNC_EVERY = (0, 1, 2, 5)
#: Every variant (the compile ones warm up for minutes: ``--variants all`` or by name).
ALL_GPU_VARIANTS = tuple(GPU_VARIANTS)
#: The P2P edits timed: (UNet dtype, fast mode of the edit loop or None for the eager loop,
#: targets). The fast mode is ``cuda-graph`` on CUDA; ``--cpu-smoke`` runs ``static-eager``
#: in its place and records the graph runs as skipped.
GPU_EDITS: tuple[tuple[torch.dtype, str | None, int], ...] = tuple(
    (dt, mode, k) for dt in (torch.float32, torch.bfloat16) for mode in (None, "cuda-graph")
    for k in (1, 4))
_DTYPE_ORDER = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def sd15_random_editor(device: str | torch.device = "cuda", *, smoke: bool = False,
                       seed: int = 0) -> Editor:
    """An :class:`Editor` over an SD-1.5-shaped pipeline with random weights (fp32).

    The compute of a fixed-iteration null-text run does not depend on the weights' values,
    so timings stand for a real SD 1.5 checkpoint (none can reach the GPU machine). The
    tokenizer is the real CLIP tokenizer bundled with the "shapes" model.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .model import Model, bundled_model_path

    unet_cfg, vae_cfg, text_cfg = dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT)
    if smoke:
        unet_cfg.update(SMOKE_UNET)
        vae_cfg.update(SMOKE_VAE)
        text_cfg.update(SMOKE_TEXT)
    with torch.random.fork_rng(devices=[]):  # random init without touching the global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    tok = CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return Editor(Model.from_pipe(pipe, "sd15-random" + ("-smoke" if smoke else ""),
                                  device=device))


#: SDXL's VAE (SD's architecture, its own scaling factor; overflows in float16, hence
#: ``force_upcast``).
SDXL_VAE: dict[str, Any] = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025,
                                force_upcast=True)
#: ``--cpu-smoke`` for SDXL: 128x128 images, two 64-wide text encoders.
SMOKE_SDXL_UNET = dict(block_out_channels=(32, 32, 64), sample_size=16, norm_num_groups=32,
                       transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
                       cross_attention_dim=128, addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=6 * 8 + 64)


def sdxl_pipeline(unet, vae, text, text2):
    """A ``StableDiffusionXLPipeline`` over the given modules, with the bundled CLIP tokenizer
    twice (the second with SDXL's ``"!"`` padding token) and SDXL base's betas (as SD 1.5's)
    as DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from .model import bundled_model_path

    folder = bundled_model_path() / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(folder)
    tok2 = CLIPTokenizer.from_pretrained(folder, pad_token="!")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched)


def sdxl_random_editor(device: str | torch.device = "cuda", *, smoke: bool = False,
                       seed: int = 0) -> Editor:
    """An :class:`Editor` over an SDXL-base-shaped ``StableDiffusionXLPipeline`` with random
    weights (fp32; UNet 2.57 B parameters, CLIP ViT-L and OpenCLIP ViT-bigG text encoders,
    1024x1024), assembled by :func:`sdxl_pipeline`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .model import Model

    unet_cfg, vae_cfg = dict(SDXL_UNET), dict(SDXL_VAE)
    text_cfg, text2_cfg = dict(SD15_TEXT), dict(SDXL_TEXT_2)
    if smoke:
        unet_cfg.update(SMOKE_SDXL_UNET)
        vae_cfg.update(SMOKE_VAE)
        text_cfg.update(SMOKE_TEXT)
        text2_cfg.update(SMOKE_TEXT)
    text2_cfg["pad_token_id"] = 0  # OpenCLIP's "!" padding
    with torch.random.fork_rng(devices=[]):  # random init without touching the global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg))
    pipe = sdxl_pipeline(unet, vae, text, text2)
    return Editor(Model.from_pipe(pipe, "sdxl-random" + ("-smoke" if smoke else ""),
                                  device=device))


#: ``bench gpu --arch sdxl`` runs these variants (the fast path is SD 1.x/2.x only).
SDXL_GPU_VARIANTS = ("eager-fp32", "eager-bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_null_text(editor: Editor, images: list, prompts: list[str], *, fast: Any, steps: int,
                   num_inner_steps: int, timed_steps: int | None,
                   early_stop_epsilon: float | None = None,
                   sync_every: int | None = None) -> dict[str, Any]:
    """Time one null-text inversion (early stopping off unless asked) of ``images`` in one
    batch.

    The DDIM pivots (with image and text encoding) are timed whole; the optimisation for
    ``timed_steps`` timesteps (each costs the same with a fixed number of inner steps) and
    scaled to ``steps``, as the reference benchmark does; ``None`` times all of them.
    """
    from .inversion import invert_batch
    from .progress import Cancelled

    dev = editor.device
    k = steps if timed_steps is None else max(1, min(int(timed_steps), steps))
    stop_at = steps + k
    marks: dict[int, float] = {}

    def mark(done: int, total: int) -> bool:
        _sync(dev)
        marks[done] = time.perf_counter()
        return done < stop_at or stop_at >= total

    _sync(dev)
    t0 = time.perf_counter()
    try:
        invert_batch(editor.model, images, prompts,
                     InvertOptions(steps=steps, num_inner_steps=num_inner_steps,
                                   early_stop_epsilon=early_stop_epsilon,
                                   sync_every=sync_every), fast=fast, callback=mark,
                     progress=False)
    except Cancelled:
        pass
    _sync(dev)
    wall = time.perf_counter() - t0
    b = len(images)
    pivots = marks[steps] - t0
    per_step = (marks[steps + k] - marks[steps]) / k
    return {"batch": b, "seconds_per_image": (pivots + per_step * steps) / b,
            "pivots_seconds": pivots, "optimisation_seconds_per_timestep": per_step,
            "timed_timesteps": k, "extrapolated": k < steps, "wall_seconds": wall}


def edit_targets(caption: str, color: str, k: int) -> list[str]:
    """``k`` colour swaps of a scene caption (same word count: replace edits)."""
    others = [c for c in ("blue", "red", "green", "yellow", "purple", "orange") if c != color]
    return [caption.replace(color, c, 1) for c in others[:k]]


def time_edit(editor: Editor, image, prompt: str, targets: str | list[str], *, steps: int,
              fast: str | None = None) -> dict[str, Any]:
    """Seconds of one Prompt-to-Prompt edit (source + ``targets``, ``steps`` steps, default
    controls; the inversion is DDIM: the edit's cost does not depend on the inversion
    method). ``fast``: the edit loop's mode (``EditOptions.fast``; None: the eager loop).
    Warm-up first: the eager loop on a 2-step inversion; a fast loop on the timed inversion
    itself (its graphs are per shape: ``warmup_seconds`` is what a first edit pays once).
    ``images``: the edited images, for comparing loops."""
    from .options import EditOptions

    dev = editor.device
    targets = [targets] if isinstance(targets, str) else list(targets)
    opts = EditOptions(fast=fast)
    inv = editor.invert(image, prompt, InvertOptions(method="ddim", steps=steps,
                                                     check_reconstruction=False), progress=False)
    _sync(dev)
    t0 = time.perf_counter()
    warm = inv if fast is not None else editor.invert(
        image, prompt, InvertOptions(method="ddim", steps=2, check_reconstruction=False),
        progress=False)
    editor.edit_many(warm, targets, opts, progress=False)
    _sync(dev)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = editor.edit_many(inv, targets, opts, progress=False)
    _sync(dev)
    out = {"seconds": time.perf_counter() - t0, "engine_seconds": res[0].seconds,
           "warmup_seconds": warm_s, "steps": steps, "targets": len(targets),
           "loop": fast or "eager"}
    fp = editor.fast_path(fast)
    if fp is not None:
        caps = [r.capture_seconds for r in fp._edit_runners.values() if r.capture_seconds]
        if caps:
            out["capture_seconds"] = caps
    out["images"] = [r.image for r in res]
    return out


def _image_psnr(a, b) -> float | None:
    """PSNR of two images; ``None`` where they are identical (infinite)."""
    if np.array_equal(np.asarray(a), np.asarray(b)):
        return None
    return psnr(a, b)


def quality_null_text(editor: Editor, image, prompt: str, *, fast: Any, steps: int,
                      num_inner_steps: int) -> dict[str, Any]:
    """A whole null-text inversion (early stop off) through ``fast`` and its reconstruction
    with the UNet as it is: the reconstruction (for comparing with the fp32 path's) and its
    PSNR against the input."""
    from .inversion import invert_batch

    inv = invert_batch(editor.model, [image], [prompt],
                       InvertOptions(steps=steps, num_inner_steps=num_inner_steps,
                                     early_stop_epsilon=None, check_reconstruction=False),
                       fast=fast, progress=False)[0]
    rec = editor.reconstruct(inv, progress=False)
    return {"steps": steps, "num_inner_steps": num_inner_steps,
            "psnr_vs_input": psnr(rec, image), "image": rec}


def bench_gpu(*, device: str | torch.device | None = None, smoke: bool = False,
              steps: int = 50, num_inner_steps: int = 10, timed_steps: int | None = 5,
              batches: tuple[int, ...] = (1, 8), variants: tuple[str, ...] = DEFAULT_GPU_VARIANTS,
              edit: bool = True, quality_steps: int | None = 10, out_path: str | None = None,
              log: Any = None, arch: str = "sd15") -> dict[str, Any]:
    """Null-text inversion and P2P edit timings at SD 1.5 size (random weights), JSON-ready;
    ``arch="sdxl"``: SDXL base's shape at 1024x1024 (:func:`sdxl_random_editor`; the fast
    path's variants and the graphed edits are skipped there, the SD 1.5 targets do not apply).

    Variants (:data:`GPU_VARIANTS`) run in order on one pipeline, fp32 first, then the UNet
    converted to bf16, then fp16 (fp32 runs at batch 1 only: it is the baseline). Per batch
    size each variant is warmed up (a 2-step run with one optimisation timestep; for graphs
    and compile this includes capture / compilation: ``warmup_seconds``) and then timed. With
    ``quality_steps``, each variant then inverts the first image whole (``quality_steps``
    steps, the inner steps as timed, no early stop) and samples it back: its ``quality``
    holds the reconstruction's PSNR against the input and against the ``eager-fp32``
    variant's reconstruction, and ``delta_db`` (its PSNR against the input minus fp32's;
    target >= -0.3 dB). Edits (:data:`GPU_EDITS`): 1 and 4 targets through the eager and
    the graphed edit loop, fp32 and bf16, each fast edit compared with the eager one
    (``psnr_vs_eager``: None = identical images). A variant or edit that cannot run on this
    device is recorded as ``skipped`` with the reason; a failing one with its error, and the
    run goes on. ``out_path``: the JSON is rewritten after each variant, so a run cut short
    keeps what it measured.
    """
    import json
    from pathlib import Path

    from .fastpath import FastPath

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    unknown = [v for v in variants if v not in GPU_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(GPU_VARIANTS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not smoke:
        raise ValueError("bench gpu needs a CUDA device; use --cpu-smoke to check it on a CPU")
    T0 = time.perf_counter()
    info = machine()
    info["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out: dict[str, Any] = {
        "machine": info, "arch": arch,
        "model": f"{arch}-random" + ("-smoke" if smoke else ""),
        "steps": steps, "num_inner_steps": num_inner_steps, "early_stop": False,
        "timed_timesteps": timed_steps, "quality_steps": quality_steps,
        "targets": GPU_TARGETS if arch == "sd15" else None, "results": {}, "edits": {}}

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    def save() -> None:
        out["wall_seconds"] = time.perf_counter() - T0
        if out_path:
            Path(out_path).write_text(json.dumps(out, indent=1))

    t0 = time.perf_counter()
    build = sd15_random_editor if arch == "sd15" else sdxl_random_editor
    editor = build(dev, smoke=smoke)
    out["build_seconds"] = time.perf_counter() - t0
    unet = editor.pipe.unet
    out["unet_params_M"] = sum(p.numel() for p in unet.parameters()) / 1e6
    out["image_size"] = editor.native_size
    size = editor.native_size
    n = max(batches)
    items = [scenes.sample(9_200_000 + k, n_objects=1 + k % 2, size=size) for k in range(n)]
    images, prompts = [sc.image for sc in items], [sc.caption for sc in items]
    color = items[0].scene.objects[0].color
    eager_images: dict[tuple[str, int], list] = {}
    reference: dict[str, Any] = {}  # the eager-fp32 reconstruction, for the PSNR against it

    def timed_edits(dtype: torch.dtype) -> None:
        label = str(dtype).removeprefix("torch.")
        for dt, mode, k in GPU_EDITS:
            if dt != dtype:
                continue
            name = f"{label}-{mode or 'eager'}-{k}"
            r: dict[str, Any] = {"dtype": label, "loop": mode or "eager", "targets": k}
            out["edits"][name] = r
            loop = mode
            if mode is not None and arch == "sdxl":
                r["skipped"] = "the fast edit loop runs SD 1.x/2.x UNets only"
                continue
            if mode is not None and dev.type != "cuda":
                r["skipped"] = f"fast={mode!r} needs a CUDA device; timed 'static-eager' instead"
                loop = "static-eager"
                r["loop"] = loop
            try:
                got = time_edit(editor, images[0], prompts[0],
                                edit_targets(prompts[0], color, k), steps=steps, fast=loop)
                imgs = got.pop("images")
                r.update(got)
                if mode is None:
                    eager_images[(label, k)] = imgs
                elif (label, k) in eager_images:
                    r["psnr_vs_eager"] = [_image_psnr(a, b) for a, b in
                                          zip(imgs, eager_images[(label, k)], strict=True)]
                say(f"edit {name} ({r['loop']}): {r['seconds']:.2f} s")
            except Exception as exc:  # noqa: BLE001 - record it, keep the other figures
                r["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                say(f"edit {name}: {r['error']}")
            save()

    compiled: dict[int, torch.nn.Module] = {}  # one compilation shared by the compile modes
    say(f"bench gpu: {info['device']}, UNet {out['unet_params_M']:.1f} M parameters")
    edited: set[torch.dtype] = set()
    order = sorted(variants, key=lambda v: _DTYPE_ORDER[GPU_VARIANTS[v][0]])
    if quality_steps and "eager-fp32" not in order:
        order.insert(0, "eager-fp32")  # the baseline the others' quality is measured against
    for name in order:
        dtype, mode, channels_last = GPU_VARIANTS[name]
        res: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "mode": mode or "plain",
                               "channels_last": channels_last}
        out["results"][name] = res
        fast = None
        if mode is not None and arch == "sdxl":
            res["skipped"] = "the fast null-text path runs SD 1.x/2.x UNets only"
            continue
        if mode is not None:
            fast = FastPath(mode=mode, channels_last=channels_last)
            if fast.compiled:
                fast._unets = compiled
            try:
                fast.check_device(dev)
            except ValueError as exc:  # cuda-graph / compile on a CPU (--cpu-smoke)
                res["skipped"] = str(exc)
                save()
                continue
        if unet.dtype != dtype:
            if edit and unet.dtype not in edited:
                timed_edits(unet.dtype)
                edited.add(unet.dtype)
            unet.to(dtype)
        try:
            for b in batches if dtype != torch.float32 else (1,):  # fp32: the baseline only
                t0 = time.perf_counter()  # warm-up: one timestep (capture / compile per shape)
                time_null_text(editor, images[:b], prompts[:b], fast=fast, steps=2,
                               num_inner_steps=1, timed_steps=1)
                res.setdefault("warmup_seconds", {})[f"batch{b}"] = time.perf_counter() - t0
                r = time_null_text(editor, images[:b], prompts[:b], fast=fast, steps=steps,
                                   num_inner_steps=num_inner_steps, timed_steps=timed_steps)
                res[f"batch{b}"] = r
                say(f"{name} batch {b}: {r['seconds_per_image']:.2f} s/image")
            if name == SYNC_VARIANT[dev.type == "cuda"]:
                # what a host check of the early-stop mask every k inner steps costs: random
                # weights never stop early, so every k runs every pass; the time above k=0 is
                # the checks' (the passes they save on real images: bench early-stop)
                sync: dict[str, Any] = {}
                for k in SYNC_EVERY:
                    kw = dict(fast=fast, num_inner_steps=num_inner_steps,
                              early_stop_epsilon=1e-5, sync_every=k)
                    time_null_text(editor, images[:1], prompts[:1], steps=2, timed_steps=1, **kw)
                    r = time_null_text(editor, images[:1], prompts[:1], steps=steps,
                                       timed_steps=timed_steps, **kw)
                    sync[f"k{k}"] = r["optimisation_seconds_per_timestep"]
                res["early_stop_check_seconds_per_timestep"] = sync
                say(f"{name} early-stop checks: {sync}")
            if quality_steps:
                q = quality_null_text(editor, images[0], prompts[0], fast=fast,
                                      steps=quality_steps, num_inner_steps=num_inner_steps)
                rec = q.pop("image")
                if name == "eager-fp32":
                    reference.update(image=rec, psnr=q["psnr_vs_input"])
                if reference:
                    q["psnr_vs_fp32"] = _image_psnr(rec, reference["image"])
                    q["delta_db"] = q["psnr_vs_input"] - reference["psnr"]
                res["quality"] = q
                say(f"{name} quality: {q}")
            if fast is not None:
                caps = [rn.capture_seconds for rn in fast._runners.values() if rn.capture_seconds]
                if caps:
                    res["capture_seconds"] = caps
        except Exception as exc:  # noqa: BLE001 - a failing variant must not lose the others
            res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            say(f"{name}: {res['error']}")
        fast = None  # free this variant's graphs and UNet copies before the next one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if edit:
        for dt in (torch.float32, torch.bfloat16):
            if dt not in edited:
                unet.to(dt)
                timed_edits(dt)
                edited.add(dt)
    out["checks"] = ("smoke run: not a measurement" if smoke else _gpu_checks(out)
                     if arch == "sd15" else "no targets for SDXL: the timings are the result")
    save()
    return out


def _gpu_checks(out: dict[str, Any]) -> dict[str, Any]:
    """Best measured figure per target and whether it is met (None: not measured)."""
    def best(batch: int) -> tuple[float | None, str | None]:
        cands = [(r[f"batch{batch}"]["seconds_per_image"], name)
                 for name, r in out["results"].items() if f"batch{batch}" in r]
        return min(cands) if cands else (None, None)

    checks: dict[str, Any] = {}
    for b, key in ((1, "nti_seconds_per_image_batch1"), (8, "nti_seconds_per_image_batch8")):
        s, name = best(b)
        checks[key] = {"best": s, "variant": name,
                       "met": None if s is None else s <= GPU_TARGETS[key]}
    for k, key in ((1, "p2p_edit_seconds"), (4, "p2p_edit_4_targets_seconds")):
        cands = [(r["seconds"], name) for name, r in out.get("edits", {}).items()
                 if r.get("targets") == k and "seconds" in r]
        s, name = min(cands) if cands else (None, None)
        checks[key] = {"best": s, "variant": name,
                       "met": None if s is None else s <= GPU_TARGETS[key]}
    lim = GPU_TARGETS["reconstruction_delta_db"]
    checks["reconstruction_delta_db"] = {
        name: {"delta_db": r["quality"]["delta_db"], "met": r["quality"]["delta_db"] >= lim}
        for name, r in out["results"].items() if "delta_db" in r.get("quality", {})}
    return checks


def bench_precision(editor: Editor, *, steps: int = 50, guidance: float = 7.5,
                    seeds: tuple[int, ...] = BENCH_SEEDS, dtype: torch.dtype = torch.bfloat16,
                    mode: str = "static-eager") -> dict[str, Any]:
    """What a bf16 (or fp16) UNet does to null-text reconstruction (the target: within 0.3 dB
    of fp32).

    On the same scenes (inverted in one batch, early stopping as default), PSNR of:
    ``fp32`` the plain loop; ``fast-bf16`` the fast path (``mode``: static buffers, or CUDA
    graphs on a GPU) with a bf16 copy of the UNet, embedding/Adam/loss fp32, sampled back with
    the fp32 UNet; ``bf16`` inversion and sampling both with the UNet in bf16 (what a GPU app
    running bf16 does). The VAE and text encoder stay fp32 in all three. ``dtype=float16``
    (CUDA only) names the runs ``fast-fp16`` and ``fp16``.
    """
    from diffusers import StableDiffusionPipeline

    from .fastpath import FastPath
    from .inversion import invert_batch
    from .model import Model

    items = [scenes.sample(s, n_objects=1 + k % 2, size=editor.native_size)
             for k, s in enumerate(seeds)]
    imgs, caps = [sc.image for sc in items], [sc.caption for sc in items]
    ceil = vae_ceiling(editor, imgs)
    label = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    fast = FastPath(mode, dtype=dtype)
    fast.check_device(editor.device)
    pipe = editor.pipe
    bf16 = Editor(Model(pipe=StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=fast.unet_for(editor.model), scheduler=pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False),
        model_id=editor.model_id + f"+{label}-unet"))
    runs = {"fp32": (editor, None, editor), f"fast-{label}": (editor, fast, editor),
            label: (bf16, None, bf16)}
    out: dict[str, Any] = {"model": editor.model_id, "steps": steps, "guidance": guidance,
                           "dtype": label, "fast_mode": mode,
                           "scenes": len(seeds), "vae_ceiling_psnr": sum(ceil) / len(ceil),
                           "machine": machine(), "runs": {}}
    for name, (inv_ed, fp, rec_ed) in runs.items():
        t0 = time.perf_counter()
        invs = invert_batch(inv_ed.model, imgs, caps, InvertOptions(steps=steps, guidance=guidance),
                            fast=fp, progress=False)
        secs = time.perf_counter() - t0
        vals = [psnr(rec_ed.reconstruct(inv, progress=False), im) for inv, im in zip(invs, imgs, strict=True)]
        out["runs"][name] = {"psnr": sum(vals) / len(vals), "psnr_each": vals, "seconds": secs,
                             "inner_steps_mean": sum(sum(i.stats["inner_steps"]) for i in invs)
                             / (len(invs) * steps)}
    base = out["runs"]["fp32"]["psnr_each"]
    for name in (f"fast-{label}", label):
        r = out["runs"][name]
        r["delta_db"] = r["psnr"] - out["runs"]["fp32"]["psnr"]
        r["worst_delta_db"] = min(a - b for a, b in zip(r["psnr_each"], base, strict=True))
    return out


# -- full-size edits: memory (``pivot-edit bench fullres``) --------------------------------------


def _rss_mb() -> float:
    """This process's resident memory now (MB; Linux /proc, else the peak so far)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_fullres(*, size: tuple[int, int] = (4000, 3000), budget: int = 512 * 512,
                  steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Peak memory and time of one edit returned at full size: a ``size`` generator scene,
    inverted (DDIM, ``steps``) at SD 1.5's pixel budget on an SD-1.5-shaped random model
    (8x VAE, few channels: the compositing's cost does not depend on the weights), then
    edited with ``original=`` (upscale, feathered mask, strip-wise blend). Memory: the
    resident set sampled every 5 ms during each step, minus the resident set before it: the
    edit at the working size, the same edit returned at full size, and the full-size
    compositing alone (:func:`editor.compose.full_resolution`)."""
    from .options import EditOptions

    editor = sd15_random_editor("cpu", smoke=True, seed=seed)
    sc = scenes.sample(9_300_000 + seed, n_objects=1).scene
    image, _ = scenes.render_at(sc, *size)
    inv = editor.invert(image, sc.caption(),
                        InvertOptions(method="ddim", steps=steps, max_pixels=budget,
                                      check_reconstruction=False), progress=False)
    color = sc.objects[0].color
    target = sc.caption().replace(color, "blue" if color != "blue" else "red")
    from .compose import full_resolution

    native, native_s, _, native_growth = _peak_of(
        lambda: editor.edit(inv, target, EditOptions(), progress=False))
    res, seconds, before, growth = _peak_of(
        lambda: editor.edit(inv, target, EditOptions(), original=image, progress=False))
    _, compose_s, _, compose_growth = _peak_of(
        lambda: full_resolution(image, native.image, native.mask_image))
    everything = np.ones(native.image.size[::-1], np.float32)
    _, _, _, worst_growth = _peak_of(lambda: full_resolution(image, native.image, everything))
    w, h = size
    plane = w * h * 4 / 2**20  # one full-size float32 plane, MB
    return {
        "machine": machine(), "model": editor.model_id, "original_size": [w, h],
        "working_size": list(inv.image_size), "steps": steps,
        "result_size": list(res.image.size),
        "kept_original_pixels": res.options["full_resolution"]["kept_original_pixels"],
        "border_px": res.options["full_resolution"]["border_px"],
        "edit_seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
        "peak_growth_mb": round(growth, 1),
        "native_edit_seconds": round(native_s, 2), "native_edit_peak_growth_mb": round(native_growth, 1),
        "compose_seconds": round(compose_s, 2), "compose_peak_growth_mb": round(compose_growth, 1),
        "float32_plane_mb": round(plane, 1),
        "compose_peak_growth_in_float32_planes": round(compose_growth / plane, 2),
        "compose_whole_image_mask_peak_growth_mb": round(worst_growth, 1),
        "compose_whole_image_mask_in_float32_planes": round(worst_growth / plane, 2),
        "rgb_uint8_mb": round(w * h * 3 / 2**20, 1),
        "mask_fraction": round(float((native.mask_image > 0.5).mean()), 4)
        if native.mask_image is not None else None,
    }


# -- what a user needs (``pivot-edit bench requirements``) ---------------------------------------

#: SDXL base 1.0's UNet (2.57 B parameters), as in its ``unet/config.json``.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
#: SDXL's second text encoder (OpenCLIP ViT-bigG/14, with projection).
SDXL_TEXT_2: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=1280,
)
ARCHS = ("sd15", "sdxl")


def _param_counts(arch: str) -> dict[str, int]:
    """Parameters per component, counted on the meta device (nothing allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel(**(SD15_UNET if arch == "sd15" else SDXL_UNET)),
            "vae": AutoencoderKL(**SD15_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        }
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


def _peak_of(fn: Any, device: torch.device | None = None) -> tuple[Any, float, float, float]:
    """``fn()``'s (value, seconds, memory before in MB, peak growth in MB): CUDA's allocator
    on a GPU, the resident set sampled every 5 ms on a CPU."""
    import gc
    import threading

    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        value = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return value, time.perf_counter() - t0, before / 2**20, (peak - before) / 2**20
    before = _rss_mb()
    top = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            top[0] = max(top[0], _rss_mb())
            stop.wait(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        value = fn()
    finally:
        stop.set()
        watcher.join()
    return value, time.perf_counter() - t0, before, top[0] - before


def bench_requirements(arch: str = "sd15", *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, steps: int = 2,
                       measure: bool = True) -> dict[str, Any]:
    """What a user needs for ``arch`` ("sd15" or "sdxl"): parameters and weight bytes per
    component, counted from the published configs (a checkpoint's download is its weights
    plus a few MB of configs and tokenizer), and, with ``measure`` (SD 1.5 shape only), the
    engine's own peak memory and seconds on a random-weight pipeline of the real shape at
    512x512: a DDIM inversion, a null-text inversion (one Adam step per timestep: forward and
    backward through the UNet, its most memory-hungry call) and a Prompt-to-Prompt edit
    (4 UNet rows with attention stored), each ``steps`` DDIM steps, VAE included. Memory is
    the allocator's peak above the loaded pipeline on CUDA, the resident set's on a CPU;
    seconds per step are the run's seconds over ``steps`` (VAE included, so an upper bound)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 50:
        raise ValueError(f"steps must be an integer 1..50, got {steps!r}")
    counts = _param_counts(arch)
    total = sum(counts.values())
    out: dict[str, Any] = {
        "machine": machine(), "arch": arch,
        "parameters_M": {k: round(v / 1e6, 1) for k, v in counts.items()},
        "weights_gb": {"float16": round(2 * total / 1e9, 2), "float32": round(4 * total / 1e9, 2)},
    }
    if not measure:
        return out
    if arch != "sd15":
        raise ValueError("measured requirements exist for --arch sd15 only (use --no-measure)")
    from .options import EditOptions

    dev = torch.device(device)
    rss0 = _rss_mb()
    editor = sd15_random_editor(dev, seed=0)
    if dtype != torch.float32:
        editor.pipe.to(dtype=dtype)
    loaded_mb = _rss_mb() - rss0
    sc = scenes.sample(9_400_000, n_objects=1).scene
    image, _ = scenes.render_at(sc, 512, 512)
    prompt = sc.caption()
    color = sc.objects[0].color
    target = prompt.replace(color, "blue" if color != "blue" else "red")
    runs: dict[str, Any] = {}
    inv_box: list[Any] = []

    def invert(method: str) -> None:
        opts = InvertOptions(method=method, steps=steps, num_inner_steps=1,
                             early_stop_epsilon=None, check_reconstruction=False)
        inv_box[:] = [editor.invert(image, prompt, opts, progress=False)]

    for name, fn in (("ddim_inversion", lambda: invert("ddim")),
                     ("null_text_inversion", lambda: invert("null-text")),
                     ("p2p_edit", lambda: editor.edit(inv_box[0], target, EditOptions(),
                                                      progress=False))):
        _, sec, _, peak = _peak_of(fn, dev)
        runs[name] = {"seconds": round(sec, 2), "seconds_per_step": round(sec / steps, 2),
                      "peak_growth_mb": round(peak, 1)}
    out["measured"] = {
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "image_size": 512,
        "steps": steps, "null_text_inner_steps": 1,
        "pipeline_weights_mb": round(sum(p.numel() * p.element_size() for m in
                                         (editor.pipe.unet, editor.pipe.vae, editor.pipe.text_encoder)
                                         for p in m.parameters()) / 2**20, 1),
        "load_rss_growth_mb": round(loaded_mb, 1) if dev.type == "cpu" else None,
        **runs,
        "note": "peak growth is above the loaded pipeline; a GPU adds its context (~0.5 GB). "
                "A full null-text inversion is steps x num_inner_steps (default 50 x 10) of "
                "the one-step cost's UNet part",
    }
    return out


# -- batch throughput per engine (``pivot-edit bench batch``) -------------------------------------


def bench_batch(engine: Any, load: Any, *, threads: int | None = None, items: int = 8,
                steps: int = 4, method: str = "ddim", out: str | None = None) -> dict[str, Any]:
    """Items per second of ``pivot-edit batch`` on ``items`` generator scenes (one colour
    swap each, ``method`` inversion with ``steps`` steps) through ``engine`` (an
    :class:`~editor.options.EngineOptions`) with the model ``load`` names (a
    :class:`~editor.options.LoadOptions`). ``items_per_s`` is over the whole run's wall
    time, start-up included (Ray's start and every worker's model load, or the local
    model load); ``busy_items_per_s`` adds up each worker's items per busy second (the
    rate once they are up). ``out``: the output folder (default: a temporary one)."""
    import json
    import tempfile
    from pathlib import Path

    from .batch import read_manifest, run_batch
    from .options import InvertOptions

    if not isinstance(items, int) or isinstance(items, bool) or not 1 <= items <= 10_000:
        raise ValueError(f"items must be an integer 1..10000, got {items!r}")
    InvertOptions(method=method, steps=steps)  # checked before any work
    with tempfile.TemporaryDirectory(prefix="pivot-bench-batch-") as tmp:
        folder = Path(out) if out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(items):
            s = scenes.sample(9_200_000 + i, n_objects=1, colors=("red",), background="white")
            s.image.save(folder / f"b{i}.png")
            rows.append({"id": f"b{i}", "image": str((folder / f"b{i}.png").absolute()),
                         "prompt": s.caption, "edits": [s.caption.replace("red", "blue", 1)]})
        manifest = folder / "bench.jsonl"
        manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        todo = read_manifest(manifest)
        results = folder / "out"
        defaults = {"method": method, "steps": steps}
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        if engine.engine == "ray":
            from .ray_engine import ModelSpec, run_batch_ray

            report = run_batch_ray(ModelSpec(load, threads=threads),
                                   todo, results, engine=engine, defaults=defaults,
                                   progress=False)
        else:
            if threads:
                torch.set_num_threads(threads)
            report = run_batch(lambda: Editor.load(load),
                               todo, results, defaults=defaults, progress=False)
        wall = time.perf_counter() - t0
        summary = json.loads((results / "summary.json").read_text())
    workers = summary.get("workers", [])
    failed = [r.id for r in report.failed]
    return {
        "engine": engine.engine, "workers_asked": engine.workers, "address": engine.address,
        "model": load.model, "items": items, "method": method, "steps": steps,
        "failed": failed, "wall_seconds": round(wall, 2),
        "items_per_s": round(items / wall, 4),
        "busy_items_per_s": round(sum(w.get("items_per_s") or 0 for w in workers), 4),
        "workers": workers,
        "load_average_before": load0,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": machine(),
    }
