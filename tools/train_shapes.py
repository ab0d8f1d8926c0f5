"""Train the bundled "shapes" Stable-Diffusion-format model from scratch.

Three stages, all seeded:
1. VAE (``AutoencoderKL``, 4x downsampling, 4 latent channels) on generator scenes,
   L1 + MSE reconstruction with a tiny KL term; then ``scaling_factor`` = 1 / std
   of the latents, as SD does.
2. UNet (``UNet2DConditionModel``) and CLIP text encoder (``CLIPTextModel``, over the
   real CLIP tokenizer) trained jointly for epsilon prediction on SD's
   scaled-linear betas, captions dropped 10% of the time (classifier-free
   guidance), EMA weights kept. With ``--text-from DIR --freeze-text`` the text
   encoder is instead loaded (e.g. the CLIP-style pre-trained one of
   ``tools/train_clip.py``) and kept **frozen**, as Stable Diffusion keeps CLIP;
   only the UNet trains.
3. The folder is written with ``StableDiffusionPipeline.save_pretrained`` (fp16
   safetensors, DDIM scheduler with SD's settings) and evaluated with the
   generator's ground truth (``editor.scenes.check_image``).

    python tools/train_shapes.py --out assets/shapes --bpe bpe_simple_vocab_16e6.txt.gz
    # v3 recipe: frozen contrastive text encoder, size words in 30% of captions
    python tools/train_shapes.py --out v3 --tokenizer-from clip/tokenizer \
        --text-from clip/text_encoder --freeze-text --graded 0.3 --vae-from assets/shapes

``--image-size``, ``--vae-channels``, ``--unet-channels`` and ``--layers-per-block``
shrink the model for CPU prototypes (``tools/train_v3_gpu.py --preset cpu-prototype``).

Writes ``train_log.json`` (steps, seconds, losses, fidelity) into the folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editor import scenes  # noqa: E402
from tools.build_tokenizer import build as build_tokenizer  # noqa: E402

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000)
IMAGE = 64
VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128),
               layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=IMAGE)
UNET_CFG = dict(sample_size=IMAGE // 4, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32)


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in str(text).split(","))


def vae_config(args) -> dict:
    """``VAE_CFG`` at ``args.image_size`` with ``args.vae_channels``."""
    ch = _channels(args.vae_channels)
    return {**VAE_CFG, "sample_size": args.image_size, "block_out_channels": ch,
            "norm_num_groups": min(32, min(ch))}


def unet_config(args, cross_dim: int = 64) -> dict:
    """``UNET_CFG`` at ``args.image_size`` (latents a quarter of it) with ``args.unet_channels``
    and ``args.layers_per_block``; ``cross_dim`` is the text encoder's width."""
    ch = _channels(args.unet_channels)
    return {**UNET_CFG, "sample_size": args.image_size // 4, "block_out_channels": ch,
            "layers_per_block": args.layers_per_block, "norm_num_groups": min(32, min(ch)),
            "cross_attention_dim": cross_dim}
TEXT_CFG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _make(seed: int, two_object: float = 0.6, size: int = IMAGE, graded: float = 0.0
          ) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed)
    # two-object scenes are the hard part (binding colour and side)
    n = 2 if rng.random() < two_object else 1
    # graded: share of objects with a size word (editor.scenes, "small"/"big")
    scene = scenes.random_scene(rng, size=size, n_objects=n, graded=graded)
    img, _ = scene.render()
    return np.asarray(img), scene.caption()


def make_dataset(n: int, seed: int, workers: int, two_object: float = 0.6, size: int = IMAGE,
                 graded: float = 0.0, offset: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``n`` scenes of seeds ``seed * 10_000_000 + offset + i``: uint8 images and captions."""
    seeds = [seed * 10_000_000 + offset + i for i in range(n)]
    fn = partial(_make, two_object=two_object, size=size, graded=graded)
    if workers <= 1:
        out = [fn(s) for s in seeds]
    else:
        with Pool(workers) as pool:
            out = pool.map(fn, seeds, chunksize=max(1, min(512, n // workers)))
    imgs = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).contiguous()
    return imgs, [o[1] for o in out]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def fit_steps(step: int, t0: float, requested: int, budget: float) -> int:
    """With a time budget, fix the step count after 200 timed steps so the LR schedule completes."""
    if budget and step == 200:
        per = (time.time() - t0) / 200
        return max(201, min(requested, int(budget / per)))
    return requested


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(imgs, args, dev, log):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args)).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    total = args.vae_steps
    step = 0
    while step < total:
        total = fit_steps(step, t0, total, args.vae_budget)
        for pg in opt.param_groups:
            pg["lr"] = args.vae_lr * cosine(step, total, 200)
        idx = torch.randint(0, len(imgs), (args.vae_batch,), generator=g)
        x = to_unit(imgs[idx].to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == total - 1:
            mse = F.mse_loss(rec.clamp(-1, 1), x).item() / 4  # pixel range 2 -> 1
            print(f"vae {step}/{total} loss {loss.item():.4f} psnr {10 * math.log10(1 / mse):.2f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    log["vae_steps"] = total
    log["vae_seconds"] = time.time() - t0
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, imgs, dev, batch=512) -> torch.Tensor:
    out = []
    for i in range(0, len(imgs), batch):
        x = to_unit(imgs[i : i + batch].to(dev))
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def vae_psnr(vae, dev, n=256, seed=999_000, size: int = IMAGE) -> float:
    imgs = torch.from_numpy(np.stack([_make(seed + i, size=size)[0] for i in range(n)]))
    imgs = imgs.permute(0, 3, 1, 2)
    vals = []
    for i in range(0, n, 64):
        x = to_unit(imgs[i : i + 64].to(dev))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        a = ((rec + 1) * 127.5).round()
        b = ((x + 1) * 127.5).round()
        mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
        vals += (10 * torch.log10(255.0**2 / mse.clamp_min(1e-8))).tolist()
    return float(np.mean(vals))


def train_unet(latents, captions, tokenizer, args, dev, log):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    if args.text_from:
        text = CLIPTextModel.from_pretrained(args.text_from, torch_dtype=torch.float32).to(dev)
    else:
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CFG)).to(dev)
    # the UNet is drawn first from the same seed whatever the text encoder, so a joint and
    # a frozen run start from the same UNet weights
    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**unet_config(args, text.config.hidden_size)).to(dev)
    frozen = bool(args.freeze_text)
    if frozen:
        text.eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**SD_BETAS)
    acp = noise_sched.alphas_cumprod.to(dev)
    snr = acp / (1 - acp)
    # Min-SNR-gamma weighting for epsilon prediction (Hang et al. 2023, eq. 10):
    # w_t = min(SNR_t, gamma) / SNR_t; gamma 0 turns it off.
    weight = (snr.clamp(max=args.min_snr) / snr) if args.min_snr else torch.ones_like(snr)
    params = list(unet.parameters()) + ([] if frozen else list(text.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2,
                            fused=dev.type == "cuda")
    ema_u = copy.deepcopy(unet).requires_grad_(False)
    ema_t = text if frozen else copy.deepcopy(text).requires_grad_(False)
    ema_params = list(ema_u.parameters()) + ([] if frozen else list(ema_t.parameters()))
    length = int(tokenizer.model_max_length)
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(dev)
    empty = tokenizer([""], padding="max_length", max_length=length,
                      return_tensors="pt").input_ids[0]
    empty = empty.to(dev)
    latents = (latents * log["scaling_factor"]).to(dev)  # all data on the device: no copies per step
    g = torch.Generator(dev).manual_seed(args.seed + 3)
    t0 = time.time()
    total = args.unet_steps
    step = 0
    while step < total:
        total = fit_steps(step, t0, total, args.unet_budget)
        for pg in opt.param_groups:
            pg["lr"] = args.lr * cosine(step, total, 500)
        idx = torch.randint(0, len(latents), (args.batch,), generator=g, device=dev)
        z0 = latents[idx]
        drop = torch.rand(args.batch, generator=g, device=dev) < 0.1
        tok = torch.where(drop[:, None], empty[None], ids[idx])
        noise = torch.randn(z0.shape, generator=g, device=dev)
        t = torch.randint(0, 1000, (args.batch,), generator=g, device=dev)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if frozen:
                with torch.no_grad():
                    emb = text(tok)[0]
            else:
                emb = text(tok)[0]
            pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = (weight[t] * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 500 == 0 or step == total - 1:
            print(f"unet {step}/{total} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    log["unet_steps"] = total
    log["unet_seconds"] = time.time() - t0
    log["text_encoder"] = f"frozen, from {args.text_from}" if frozen else (
        f"trained jointly, initialised from {args.text_from}" if args.text_from
        else "trained jointly from scratch")
    return ema_u.eval(), ema_t.eval()


@torch.no_grad()
def fidelity(pipe, dev, n_single: int, n_double: int, seed: int = 5_000_000, steps: int = 50,
             size: int = IMAGE) -> dict:
    """Generate from held-out captions and check colour, shape and sides."""
    res = {}
    for n_obj, count in ((1, n_single), (2, n_double)):
        sc = [scenes.random_scene(np.random.default_rng(seed + n_obj * 100_000 + i),
                                  n_objects=n_obj, size=size)
              for i in range(count)]
        color = shape = both = 0
        for i in range(0, count, 64):
            chunk = sc[i : i + 64]
            gens = [torch.Generator(dev).manual_seed(seed + i + j) for j in range(len(chunk))]
            imgs = pipe([s.caption() for s in chunk], num_inference_steps=steps,
                        guidance_scale=7.5, generator=gens, height=size, width=size).images
            for img, s in zip(imgs, chunk, strict=True):
                c = scenes.check_image(img, s)
                color += c.color_ok
                shape += c.shape_ok
                both += c.color_ok and c.shape_ok
        key = "single" if n_obj == 1 else "double"
        res[f"{key}_color"] = color / count
        res[f"{key}_shape"] = shape / count
        res[f"{key}_count"] = count
    return res


def shares(captions: list[str]) -> dict:
    """What the training captions hold: share of two-object scenes and of size words."""
    n = max(1, len(captions))
    return {"two_object": sum(" and " in c for c in captions) / n,
            "size_word": sum(any(f" {g} " in f" {c} " for g in scenes.GRADES) for c in captions) / n}


def _cache_key(args) -> dict:
    return {k: str(getattr(args, k)) for k in ("dataset", "seed", "two_object", "image_size",
                                                 "graded", "vae_from")}


def save_cache(args, lat: torch.Tensor, captions: list[str]) -> None:
    from safetensors.torch import save_file

    args.data_cache.mkdir(parents=True, exist_ok=True)
    save_file({"latents": lat.contiguous()}, str(args.data_cache / "latents.safetensors"))
    (args.data_cache / "data.json").write_text(json.dumps({"key": _cache_key(args),
                                                           "captions": captions}))


def load_cache(args) -> tuple[torch.Tensor, list[str]] | None:
    """Latents and captions of an earlier run with the same data arguments, or None."""
    meta = args.data_cache / "data.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    if data["key"] != _cache_key(args):
        return None
    from safetensors.torch import load_file

    return load_file(str(args.data_cache / "latents.safetensors"))["latents"], data["captions"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/shapes"))
    p.add_argument("--bpe", type=Path, default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="copy this CLIPTokenizer folder instead of building one from --bpe")
    p.add_argument("--text-from", type=Path, default=None,
                   help="load the text encoder from this CLIPTextModel folder (train_clip.py)")
    p.add_argument("--freeze-text", action="store_true",
                   help="keep the text encoder frozen (needs --text-from): only the UNet trains")
    p.add_argument("--graded", type=float, default=0.0,
                   help="probability that an object's caption gets a size word (small/big)")
    p.add_argument("--image-size", type=int, default=IMAGE)
    p.add_argument("--vae-channels", default="32,64,128")
    p.add_argument("--unet-channels", default="64,128,128")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the evaluation")
    p.add_argument("--psnr-scenes", type=int, default=256, help="held-out scenes for the VAE PSNR")
    p.add_argument("--data-cache", type=Path, default=None,
                   help="with --vae-from: keep the scenes' captions and latents here (safetensors "
                        "+ JSON) and reuse them when the data arguments match (side-by-side runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vae-steps", type=int, default=6000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--vae-budget", type=float, default=0,
                   help="seconds: cap VAE steps by the speed of the first 200 (0: no cap)")
    p.add_argument("--unet-budget", type=float, default=0,
                   help="seconds: cap UNet steps by the speed of the first 200 (0: no cap)")
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="Min-SNR-gamma loss weighting (0: plain epsilon MSE)")
    p.add_argument("--two-object", type=float, default=0.6,
                   help="fraction of training scenes with two objects")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse the VAE (and its scaling factor) of an earlier run's folder")
    p.add_argument("--eval", type=int, default=128, help="held-out prompts per object count")
    args = p.parse_args(argv)
    if (args.bpe is None) == (args.tokenizer_from is None):
        p.error("give exactly one of --bpe and --tokenizer-from")
    if args.freeze_text and not args.text_from:
        p.error("--freeze-text needs --text-from (a frozen random encoder means nothing)")

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    T0 = time.time()
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(dev)}
    if dev.type == "cuda":
        log["device_name"] = torch.cuda.get_device_name()
    if args.tokenizer_from:
        CLIPTokenizer.from_pretrained(args.tokenizer_from).save_pretrained(args.out / "tokenizer")
    else:
        build_tokenizer(args.bpe, args.out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(args.out / "tokenizer")

    cached = load_cache(args) if args.data_cache and args.vae_from else None
    t = time.time()
    if cached is None:
        imgs, captions = make_dataset(args.dataset, args.seed, args.workers, args.two_object,
                                      args.image_size, args.graded)
    else:
        imgs, (lat, captions) = None, cached
        log["data_cache"] = str(args.data_cache)
    log["data_seconds"] = time.time() - t
    log["captions"] = shares(captions)
    print(f"dataset {len(captions)} in {log['data_seconds']:.0f}s", flush=True)

    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae",
                                            torch_dtype=torch.float32).to(dev)
        vae.eval().requires_grad_(False)
        earlier = json.loads((args.vae_from / "train_log.json").read_text())
        log.update({k: earlier[k] for k in ("vae_steps", "vae_seconds") if k in earlier})
        log["vae_from"] = str(args.vae_from)
        log["vae_psnr_db"] = vae_psnr(vae, dev, n=args.psnr_scenes, size=args.image_size)
        if cached is None:
            lat = encode_all(vae, imgs, dev)
            if args.data_cache:
                save_cache(args, lat, captions)
        log["scaling_factor"] = float(vae.config.scaling_factor)
    else:
        vae = train_vae(imgs, args, dev, log)
        log["vae_psnr_db"] = vae_psnr(vae, dev, n=args.psnr_scenes, size=args.image_size)
        lat = encode_all(vae, imgs, dev)
        log["scaling_factor"] = float(1.0 / lat.std())
        vae.register_to_config(scaling_factor=log["scaling_factor"])
    print(f"vae psnr {log['vae_psnr_db']:.2f} dB, scaling factor {log['scaling_factor']:.4f}", flush=True)

    unet, text = train_unet(lat, captions, tokenizer, args, dev, log)
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    pipe.to(torch.float32)
    if args.eval:
        t = time.time()
        log["fidelity"] = fidelity(pipe, dev, args.eval, args.eval, steps=args.eval_steps,
                                   size=args.image_size)
        log["eval_seconds"] = time.time() - t
    log["total_seconds"] = time.time() - T0
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1), flush=True)


if __name__ == "__main__":
    main()
