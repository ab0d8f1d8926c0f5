# ruff: noqa
# The reference timing of the published null-text loop at SD 1.5 size, kept verbatim (do
# not edit it: it is the yardstick every speed figure is a ratio to).
# tools/gpu_check.sh runs it in the same call as `pivot-edit bench gpu`.
"""Reference timing for null-text inversion at Stable Diffusion 1.5 size.

Run it on the GPU machine in the same call as the project's own benchmark, so
that both figures come from one machine: `K=5 python3 reference_nti_gpu.py`
(needs diffusers; writes $OUT/anchor.json when OUT is set).

Weights are random (no real checkpoint can reach the accelerator machine), but
the compute of one NTI run does not depend on the weights' values when the
number of inner steps is fixed, so these figures stand for a real SD1.5 run.

Variants, each timed on the same warm GPU:
  reference : the published notebook's loop: fp32 weights that still require
              grad, per-step cond pass, 10 uncond fwd+bwd + Adam, batch-2 pass.
  fp16/bf16 : same loop, half-precision weights, weights frozen.
  batch8    : bf16, 8 images inverted at once, cost per image.
  limit     : bf16 fwd and fwd+bwd at batch 1, times the pass count of one run.
Timestep loops are timed on K of the 50 steps and scaled to 50.
"""
import json, os, sys, time

import torch
from diffusers import UNet2DConditionModel, DDIMScheduler

K = int(os.environ.get("K", "5"))
INNER = 10
STEPS = 50
dev = "cuda"
out = {}

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)


def sched():
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(STEPS)
    return s


def sync():
    torch.cuda.synchronize()


def prev_step(s, eps, t, x):
    prev_t = t - s.config.num_train_timesteps // STEPS
    a_t = s.alphas_cumprod[t]
    a_p = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_p ** 0.5 * x0 + (1 - a_p) ** 0.5 * eps


def nti_loop(unet, dtype, batch, k, freeze):
    for p in unet.parameters():
        p.requires_grad_(not freeze)
    s = sched()
    cond = torch.randn(batch, 77, 768, device=dev, dtype=dtype)
    unc0 = torch.randn(batch, 77, 768, device=dev, dtype=dtype)
    lat = torch.randn(batch, 4, 64, 64, device=dev, dtype=dtype)
    pivots = [torch.randn_like(lat) for _ in range(k + 1)]
    sync(); t0 = time.perf_counter()
    for i, t in enumerate(s.timesteps[:k]):
        unc = unc0.clone().float().requires_grad_(True)
        opt = torch.optim.Adam([unc], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            e_c = unet(lat, t, encoder_hidden_states=cond).sample
        for _ in range(INNER):
            e_u = unet(lat, t, encoder_hidden_states=unc.to(dtype)).sample
            eps = e_u + 7.5 * (e_c - e_u)
            rec = prev_step(s, eps, t, lat)
            loss = torch.nn.functional.mse_loss(rec.float(), pivots[i + 1].float())
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            ctx = torch.cat([unc.detach().to(dtype), cond])
            e = unet(torch.cat([lat] * 2), t, encoder_hidden_states=ctx).sample
            e_u, e_c = e.chunk(2)
            lat = prev_step(s, e_u + 7.5 * (e_c - e_u), t, lat)
    sync()
    return (time.perf_counter() - t0) / k * STEPS / batch


def ddim_inversion(unet, dtype):
    s = sched()
    cond = torch.randn(1, 77, 768, device=dev, dtype=dtype)
    lat = torch.randn(1, 4, 64, 64, device=dev, dtype=dtype)
    sync(); t0 = time.perf_counter()
    with torch.no_grad():
        for t in reversed(s.timesteps):
            lat = lat + 0 * unet(lat, t, encoder_hidden_states=cond).sample
    sync()
    return time.perf_counter() - t0


def pass_times(unet, dtype, n=10):
    for p in unet.parameters():
        p.requires_grad_(False)
    lat = torch.randn(1, 4, 64, 64, device=dev, dtype=dtype)
    emb = torch.randn(1, 77, 768, device=dev, dtype=dtype)
    t = torch.tensor(500, device=dev)
    with torch.no_grad():
        for _ in range(3):
            unet(lat, t, encoder_hidden_states=emb)
        sync(); t0 = time.perf_counter()
        for _ in range(n):
            unet(lat, t, encoder_hidden_states=emb)
        sync(); fwd = (time.perf_counter() - t0) / n
    e = emb.clone().requires_grad_(True)
    for _ in range(2):
        unet(lat, t, encoder_hidden_states=e).sample.sum().backward()
    sync(); t0 = time.perf_counter()
    for _ in range(n):
        unet(lat, t, encoder_hidden_states=e).sample.sum().backward()
    sync(); fb = (time.perf_counter() - t0) / n
    return fwd, fb


def flops(unet, dtype):
    from torch.utils.flop_counter import FlopCounterMode
    lat = torch.randn(1, 4, 64, 64, device=dev, dtype=dtype)
    emb = torch.randn(1, 77, 768, device=dev, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(lat, torch.tensor(500, device=dev), encoder_hidden_states=emb)
    return fc.get_total_flops()


def main():
    T0 = time.time()
    out["device"] = torch.cuda.get_device_name()
    out["torch"] = torch.__version__
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).to(dev)
    out["unet_params_M"] = sum(p.numel() for p in unet.parameters()) / 1e6
    out["fwd_gflop_b1"] = flops(unet, torch.float32) / 1e9
    print(json.dumps(out), flush=True)

    # warm-up, then the reference loop in fp32 with weights requiring grad
    nti_loop(unet, torch.float32, 1, 1, freeze=False)
    out["ref_fp32_ddim_inversion_s"] = ddim_inversion(unet, torch.float32)
    out["ref_fp32_nti_s"] = nti_loop(unet, torch.float32, 1, K, freeze=False)
    out["fp32_frozen_nti_s"] = nti_loop(unet, torch.float32, 1, K, freeze=True)
    print(json.dumps(out), flush=True)

    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        u = unet.to(dt)
        nti_loop(u, dt, 1, 1, freeze=True)
        out[f"{name}_ddim_inversion_s"] = ddim_inversion(u, dt)
        out[f"{name}_nti_s"] = nti_loop(u, dt, 1, K, freeze=True)
        fwd, fb = pass_times(u, dt)
        out[f"{name}_fwd_ms"] = fwd * 1e3
        out[f"{name}_fwdbwd_ms"] = fb * 1e3
        out[f"{name}_fwd_tflops"] = out["fwd_gflop_b1"] / fwd / 1e3
        print(json.dumps(out), flush=True)
    u = unet.to(torch.bfloat16)
    nti_loop(u, torch.bfloat16, 8, 1, freeze=True)
    out["bf16_batch8_nti_s_per_image"] = nti_loop(u, torch.bfloat16, 8, max(2, K // 2), freeze=True)
    # passes in one fixed-iteration run: 50 inversion fwd, per step 1 cond fwd,
    # 10 fwd+bwd, one batch-2 fwd (about 2 fwd)
    f, fb = out["bf16_fwd_ms"] / 1e3, out["bf16_fwdbwd_ms"] / 1e3
    out["bf16_batch1_floor_s"] = STEPS * f + STEPS * (f + INNER * fb + 2 * f)
    print(json.dumps(out), flush=True)

    if time.time() - T0 < 200 and os.environ.get("COMPILE", "1") == "1":
        try:
            uc = torch.compile(u)
            t1 = time.time()
            nti_loop(uc, torch.bfloat16, 1, 1, freeze=True)
            out["compile_warmup_s"] = time.time() - t1
            out["bf16_compiled_nti_s"] = nti_loop(uc, torch.bfloat16, 1, K, freeze=True)
        except Exception as e:  # compile is optional here
            out["compile_error"] = repr(e)[:300]
    out["wall_s"] = time.time() - T0
    print(json.dumps(out, indent=1), flush=True)
    d = os.environ.get("OUT")
    if d:
        json.dump(out, open(os.path.join(d, "anchor.json"), "w"), indent=1)


if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv:
        dev = "cpu"
        SD15.update(block_out_channels=(32, 32, 64, 64), cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        torch.cuda.synchronize = lambda: None
        torch.cuda.get_device_name = lambda: "cpu"
        K = 1
        os.environ["COMPILE"] = "0"
    main()
