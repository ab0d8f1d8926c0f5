"""Bundled model v3 in one script: CLIP-style text encoder, UNet on it frozen, re-measurements.

Stages (``--stages``, comma-separated, default all, in this order):

1. ``clip``: ``tools/train_clip.py``: the 4-layer CLIP text encoder and a small image
   tower, InfoNCE on generator scenes and captions (size words in a share of them),
   zero-shot retrieval on held-out scenes -> ``OUT/clip/`` (``clip_log.json``).
2. ``unet``: ``tools/train_shapes.py --text-from OUT/clip/text_encoder --freeze-text``:
   the UNet trained on the **frozen** encoder (VAE reused from ``--vae-from``, v2's by
   default) -> ``OUT/shapes_v3/``, a genuine diffusers SD folder (tokenizer, frozen text
   encoder, UNet, VAE, scheduler; the image tower stays in ``OUT/clip/``), with its
   fidelity in ``train_log.json``.
3. ``joint`` (only when asked, or in the ``cpu-prototype`` / ``smoke`` presets): the
   same UNet recipe with the text encoder trained jointly from scratch (v2's recipe) ->
   ``OUT/joint/``, the control arm of the prototype.
4. ``attention``: ``tools/measure_attention.py`` on the reference model (``--reference``,
   v2 by default; the joint arm where it was trained) and on v3: padding share and the
   IoU of the object words' maps -> ``OUT/results/attention.json``.
5. ``remeasure``: what was tuned on v2, with the same scripts, on ``OUT/shapes_v3``
   (P2P table, reweight on the graded attribute, leakage t2i + edits, ShapesBench,
   inversion bench) -> ``OUT/results/``; each command and its log are in
   ``OUT/results/commands.json``.

Presets: ``gpu`` (the real run; budgets sized for an H200), ``cpu-prototype`` (32x32,
small UNet, a thousand steps; the docs/model_v3.md prototype), ``smoke`` (a few steps of
everything, for tests). Every stage's arguments can be seen with ``--dry-run``.

    python tools/train_v3_gpu.py --out v3 --device cuda                      # everything
    python tools/train_v3_gpu.py --out v3 --device cuda --stages clip,unet   # ~9 min, H200
    python tools/train_v3_gpu.py --out v3 --device cpu --stages attention,remeasure
    python tools/train_v3_gpu.py --out /tmp/s --preset smoke --device cpu    # test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pragma: no cover - script use
    sys.path.insert(0, str(ROOT))

STAGES = ("clip", "unet", "joint", "attention", "remeasure")

#: per preset: arguments of each training stage and of the measurements
PRESETS: dict[str, dict] = {
    "gpu": {
        # budgets: clip + unet fit one 10-minute device call on an H200 (v2's UNet stage:
        # 441 s for 3370 steps of batch 1024 with the text encoder training too)
        "clip": ["--dataset", "100000", "--steps", "8000", "--batch", "1024", "--lr", "1e-3",
                 "--two-object", "0.7", "--graded", "0.3", "--budget", "90", "--eval", "256"],
        "unet": ["--dataset", "200000", "--unet-steps", "100000", "--batch", "1024",
                 "--lr", "7e-4", "--unet-budget", "350", "--two-object", "0.7",
                 "--graded", "0.3", "--eval", "256"],
        "attention": ["--n", "64", "--n-two", "32", "--steps", "50", "--batch", "32"],
        "joint": False,
        "remeasure": "full",
    },
    "cpu-prototype": {
        "clip": ["--dataset", "20000", "--image-size", "32", "--tower-channels", "16,32,64,64",
                 "--two-object", "0.6", "--graded", "0.3", "--steps", "3000", "--batch", "128",
                 "--budget", "600", "--eval", "128"],
        # as run for docs/model_v3.md on a loaded 2-core machine (each arm 1,500 s)
        "unet": ["--image-size", "32", "--unet-channels", "32,64,64", "--layers-per-block", "1",
                 "--dataset", "4000", "--two-object", "0.6", "--graded", "0.3",
                 "--unet-steps", "600", "--unet-budget", "1500", "--batch", "32", "--lr", "1e-3",
                 "--ema", "0.99", "--eval", "16", "--eval-steps", "25", "--psnr-scenes", "32"],
        "attention": ["--n", "24", "--n-two", "12", "--steps", "25", "--timesteps", "10"],
        "joint": True,
        "remeasure": None,
    },
    "smoke": {
        "clip": ["--dataset", "32", "--image-size", "64", "--tower-channels", "8,8,8,8",
                 "--steps", "2", "--batch", "8", "--eval", "4"],
        "unet": ["--image-size", "64", "--unet-channels", "32,32,32", "--layers-per-block", "1",
                 "--dataset", "32", "--unet-steps", "2", "--batch", "2", "--eval", "1",
                 "--eval-steps", "2", "--psnr-scenes", "2", "--graded", "0.5"],
        "attention": ["--n", "1", "--n-two", "1", "--steps", "2", "--timesteps", "1"],
        "joint": True,
        "remeasure": "smoke",
    },
}


def remeasure_commands(model: Path, res: Path, device: str, kind: str) -> list[tuple[str, list[str]]]:
    """(name, argv) of every re-measurement; ``kind`` 'full' or 'smoke' (tiny sizes)."""
    py = sys.executable
    m, d = str(model), ["--device", device]
    if kind == "smoke":
        return [
            ("p2p", [py, "tools/measure_edits.py", "--model", m, *d, "--method", "ddim",
                     "--steps", "2", "--n-color", "1", "--n-shape", "1", "--n-reweight", "0",
                     "--configs", "defaults", "p2p_word_blend", "--out", str(res / "p2p.json")]),
            ("reweight_size", [py, "tools/measure_edits.py", "--model", m, *d, "--method", "ddim",
                               "--steps", "2", "--configs", "--reweight-attr", "size",
                               "--n-reweight", "1", "--scales", "0", "2",
                               "--out", str(res / "reweight_size.json")]),
            ("leakage", [py, "tools/measure_leakage.py", "all", "--model", m, *d,
                         "--n-t2i", "1", "--n-edit", "1", "--steps", "2", "--method", "ddim",
                         "--variants", "none,replace", "--out", str(res / "leakage.json")]),
        ]
    return [
        ("p2p", [py, "tools/measure_edits.py", "--model", m, *d, "--method", "null-text",
                 "--steps", "50", "--n-color", "12", "--n-shape", "8", "--n-reweight", "4",
                 "--reweight-seed", "200", "--configs", "defaults", "p2p_plain", "p2p_word_blend",
                 "p2p_word_blend_half", "p2p_word_blend_0.9", "noise_blend_latent_only",
                 "--cache", str(res / "inversions"), "--grid", str(res / "p2p_grid.png"),
                 "--out", str(res / "p2p.json")]),
        ("reweight_size", [py, "tools/measure_edits.py", "--model", m, *d, "--method",
                           "null-text", "--steps", "50", "--configs", "--reweight-attr", "size",
                           "--n-reweight", "12", "--reweight-seed", "300",
                           "--scales", "0", "0.5", "1", "1.5", "2",
                           "--cache", str(res / "inversions"),
                           "--out", str(res / "reweight_size.json")]),
        ("leakage", [py, "tools/measure_leakage.py", "all", "--model", m, *d,
                     "--n-t2i", "64", "--n-edit", "32", "--out", str(res / "leakage.json")]),
        ("shapesbench", [py, "-m", "editor", "compare", "--bench", "shapes", "--model", m, *d,
                         "--out", str(res / "shapesbench")]),
        ("inversion_bench", [py, "-m", "editor", "bench", "inversion", "--model", m, *d]),
    ]


def plan(args) -> list[tuple[str, str, list[str]]]:
    """(stage, tool, argv) of every step, in order."""
    pre = PRESETS[args.preset]
    out, dev = args.out, ["--device", args.device]
    workers = ["--workers", str(args.workers)]
    stages = args.stages
    steps: list[tuple[str, str, list[str]]] = []
    clip, v3, joint = out / "clip", out / "shapes_v3", out / "joint"
    if "clip" in stages:
        steps.append(("clip", "train_clip", ["--out", str(clip), "--tokenizer", str(args.tokenizer),
                                              *dev, *workers, *pre["clip"]]))
    common = ["--tokenizer-from", str(clip / "tokenizer"), "--vae-from", str(args.vae_from),
              *dev, *workers, *pre["unet"]]
    if pre["joint"]:  # both arms train on the very same cached latents
        common += ["--data-cache", str(out / "data")]
    if "unet" in stages:
        steps.append(("unet", "train_shapes", ["--out", str(v3), *common, "--text-from",
                                                str(clip / "text_encoder"), "--freeze-text"]))
    if "joint" in stages:
        steps.append(("joint", "train_shapes", ["--out", str(joint), *common]))
    if "attention" in stages:
        models = []
        if args.reference:
            models += ["--model", str(args.reference), "--name", "reference"]
        if "joint" in stages or (joint / "unet").is_dir():
            models += ["--model", str(joint), "--name", "joint"]
        steps.append(("attention", "measure_attention",
                      [*models, "--model", str(v3), "--name", "frozen (v3)", *dev,
                       *pre["attention"], "--out", str(out / "results" / "attention.json")]))
    return steps


def run_tool(tool: str, argv: list[str]) -> None:
    import importlib

    importlib.import_module(f"tools.{tool}").main(argv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="working folder (created)")
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu")
    ap.add_argument("--stages", default=None,
                    help=f"comma-separated subset of {','.join(STAGES)} (default: the preset's)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes drawing the scenes")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "assets" / "shapes" / "tokenizer")
    ap.add_argument("--vae-from", type=Path, default=ROOT / "assets" / "shapes",
                    help="reuse this folder's VAE (v2's: 35 dB on held-out scenes)")
    ap.add_argument("--reference", default=None,
                    help="model the attention stage also measures ('none' for none; default: "
                         "the bundled v2, 'shapes', in the gpu preset, none otherwise)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    pre = PRESETS[args.preset]
    if args.reference is None:
        args.reference = "shapes" if args.preset == "gpu" else ""
    elif args.reference == "none":
        args.reference = ""
    default = [s for s in STAGES if s != "joint" or pre["joint"]]
    if not pre["remeasure"]:
        default.remove("remeasure")
    args.stages = args.stages.split(",") if args.stages else default
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; expected some of {STAGES}")
    args.out.mkdir(parents=True, exist_ok=True)
    res = args.out / "results"
    steps = plan(args)
    cmds = remeasure_commands(args.out / "shapes_v3", res, args.device,
                              pre["remeasure"] or "full") if "remeasure" in args.stages else []
    if args.dry_run:
        for stage, tool, a in steps:
            print(f"[{stage}] python tools/{tool}.py {shlex.join(a)}")
        for name, c in cmds:
            print(f"[remeasure:{name}] {shlex.join(c)}")
        return 0
    log_path = args.out / "v3_run.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log.setdefault("runs", []).append({"preset": args.preset, "stages": args.stages,
                                       "device": args.device, "started": time.time()})
    timings = log["runs"][-1].setdefault("seconds", {})
    for stage, tool, a in steps:
        print(f"== {stage}: python tools/{tool}.py {shlex.join(a)}", flush=True)
        t0 = time.perf_counter()
        run_tool(tool, a)
        timings[stage] = round(time.perf_counter() - t0, 1)
        log_path.write_text(json.dumps(log, indent=1))
    if cmds:
        res.mkdir(parents=True, exist_ok=True)
        done = []
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for name, c in cmds:
            print(f"== remeasure {name}: {shlex.join(c)}", flush=True)
            t0 = time.perf_counter()
            with open(res / f"{name}.log", "w") as f:
                rc = subprocess.run(c, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            secs = round(time.perf_counter() - t0, 1)
            done.append({"name": name, "argv": c, "rc": rc, "seconds": secs})
            timings[f"remeasure:{name}"] = secs
            (res / "commands.json").write_text(json.dumps(done, indent=1))
            log_path.write_text(json.dumps(log, indent=1))
            if rc:
                print(f"remeasure {name} failed (rc {rc}); see {res / (name + '.log')}", flush=True)
        failed = [d["name"] for d in done if d["rc"]]
        if failed:
            print(f"failed: {failed}", flush=True)
            return 1
    print(json.dumps(log["runs"][-1], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
