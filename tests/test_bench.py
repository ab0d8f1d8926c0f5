"""``pivot-edit bench gpu``: the SD-1.5-shaped speed benchmark, run in its CPU smoke mode."""

from __future__ import annotations

import json

import pytest
import torch

from editor.bench import ALL_GPU_VARIANTS
from editor.cli import main


def _smoke(tmp_path, capsys, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", "gpu", "--cpu-smoke", "--out", str(out), *extra]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == res
    assert res["machine"]["device"] == "cpu" and res["model"] == "sd15-random-smoke"
    assert res["steps"] == 2 and res["num_inner_steps"] == 2 and res["early_stop"] is False
    assert res["checks"].startswith("smoke run")
    return res


def _check_edits(res: dict) -> None:
    """Edits: 1 and 4 targets, eager and the fast loop (static-eager in place of the graphs
    on a CPU, its images identical to the eager loop's)."""
    e = res["edits"]
    assert set(e) == {f"{d}-{m}-{k}" for d in ("float32", "bfloat16")
                      for m in ("eager", "cuda-graph") for k in (1, 4)}
    for name, x in e.items():
        assert x["seconds"] > 0 and x["steps"] == 2 and x["targets"] == int(name[-1]), x
        if "cuda-graph" in name:
            assert "needs a CUDA device" in x["skipped"] and x["loop"] == "static-eager"
            assert x["psnr_vs_eager"] == [None] * x["targets"]  # identical images


@pytest.mark.slow
def test_bench_gpu_cpu_smoke(tmp_path, capsys):
    """A subset of the variants at batch 1 (150 s on 2 quiet cores; the SDXL smoke below runs
    the same benchmark in the default suite, and the whole smoke run is the next test)."""
    res = _smoke(tmp_path, capsys, "--batches", "1", "--variants",
                 "static-eager-fp32,static-eager-bf16,cuda-graph-fp16")
    r = res["results"]
    assert set(r) == {"eager-fp32", "static-eager-fp32", "static-eager-bf16", "cuda-graph-fp16"}
    assert "needs a CUDA device" in r["cuda-graph-fp16"]["skipped"]
    t = r["static-eager-bf16"]["batch1"]
    assert t["batch"] == 1 and t["seconds_per_image"] > 0 and t["timed_timesteps"] == 2
    assert set(r["static-eager-bf16"]["early_stop_check_seconds_per_timestep"]) == {
        "k0", "k1", "k2", "k5"}
    # reconstruction against the fp32 path (eager-fp32 joins as the baseline): static-eager
    # fp32 equals it exactly, bf16 does not
    q = r["static-eager-fp32"]["quality"]
    assert q["psnr_vs_fp32"] is None and q["delta_db"] == 0.0 and q["steps"] == 2
    assert r["static-eager-bf16"]["quality"]["psnr_vs_fp32"] > 0
    _check_edits(res)


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_every_variant(tmp_path, capsys):
    res = _smoke(tmp_path, capsys, "--variants", "all")
    r = res["results"]
    assert set(r) == set(ALL_GPU_VARIANTS)
    assert set(r["eager-fp32"]) >= {"batch1", "warmup_seconds"} and "batch2" not in r["eager-fp32"]
    for name in ("eager-bf16", "static-eager-bf16"):
        assert r[name]["dtype"] == "bfloat16"
        for b in (1, 2):
            t = r[name][f"batch{b}"]
            assert t["batch"] == b and t["seconds_per_image"] > 0 and not t["extrapolated"]
            assert t["timed_timesteps"] == 2
        assert r[name]["quality"]["psnr_vs_fp32"] > 0
    for name in ("cuda-graph-fp32", "cuda-graph-bf16", "cuda-graph-bf16-cl", "cuda-graph-fp16",
                 "compile-bf16", "compile+cuda-graph-bf16"):
        assert "needs a CUDA device" in r[name]["skipped"]
    assert r["static-eager-fp32"]["quality"]["psnr_vs_fp32"] is None
    _check_edits(res)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_gpu_refuses_cpu_without_smoke(capsys):
    assert main(["bench", "gpu", "--no-edit"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "gpu", "--cpu-smoke", "--variants", "warp-speed"]) == 2
    assert "unknown variant" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_unet_reconstruction_within_0_3_db(editor):
    """Issue 7: the fast path's reconstruction within 0.3 dB of the fp32 path (bundled model)."""
    from editor.bench import BENCH_SEEDS, bench_precision

    res = bench_precision(editor, steps=20, seeds=BENCH_SEEDS[:2])
    for name in ("fast-bf16", "bf16"):
        assert res["runs"][name]["delta_db"] >= -0.3, res["runs"]


@pytest.mark.parametrize("arch,unet_m,text_m,fp16_gb", [
    ("sd15", 859.5, {"text_encoder": 123.1}, 2.13),
    ("sdxl", 2567.5, {"text_encoder": 123.1, "text_encoder_2": 694.7}, 6.94),
])
def test_bench_requirements_counts_the_published_architectures(capsys, arch, unet_m, text_m, fp16_gb):
    """The configs the requirements table is counted from are the published ones: SD 1.5's
    UNet has 859.5 M parameters, SDXL's 2567.5 M (their model cards' figures)."""
    assert main(["bench", "requirements", "--arch", arch, "--no-measure"]) == 0
    res = json.loads(capsys.readouterr().out)
    p = res["parameters_M"]
    assert p["unet"] == unet_m and p["vae"] == 83.7
    assert {k: v for k, v in p.items() if k.startswith("text")} == text_m
    assert res["weights_gb"]["float16"] == fp16_gb
    assert res["weights_gb"]["float32"] == pytest.approx(2 * fp16_gb, abs=0.01)


def test_bench_requirements_refuses_bad_input(capsys):
    assert main(["bench", "requirements", "--arch", "sdxl"]) == 2  # measured: SD 1.5 only
    assert "--arch sd15 only" in capsys.readouterr().err
    assert main(["bench", "requirements", "--steps", "0", "--device", "cpu"]) == 2
    assert "steps must be an integer 1..50" in capsys.readouterr().err


def test_bench_gpu_sdxl_cpu_smoke(tmp_path, capsys):
    """``bench gpu --arch sdxl``: an SDXL-shaped random pipeline (tiny in smoke mode) runs
    null-text and one edit; the fast-path variants are skipped (SD 1.x/2.x only)."""
    assert main(["bench", "gpu", "--arch", "sdxl", "--cpu-smoke", "--steps", "1", "--inner", "1",
                 "--variants", "eager-fp32,eager-bf16,cuda-graph-bf16", "--quality-steps", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["arch"] == "sdxl" and res["model"] == "sdxl-random-smoke"
    assert res["image_size"] == 128 and res["targets"] is None
    r = res["results"]
    assert r["eager-fp32"]["batch1"]["seconds_per_image"] > 0
    assert r["eager-bf16"]["batch1"]["seconds_per_image"] > 0 and "batch2" not in r["eager-bf16"]
    assert "SD 1.x/2.x UNets only" in r["cuda-graph-bf16"]["skipped"]
    e = res["edits"]
    assert e["float32-eager-1"]["seconds"] > 0 and e["bfloat16-eager-1"]["seconds"] > 0
    assert e["bfloat16-eager-4"]["targets"] == 4
    assert "SD 1.x/2.x UNets only" in e["float32-cuda-graph-1"]["skipped"]
