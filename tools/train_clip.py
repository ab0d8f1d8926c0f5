"""Contrastive (CLIP-style) pre-training of the bundled model's text encoder.

Stable Diffusion conditions its UNet on a **frozen** CLIP text encoder; this stage makes
one for the "shapes" world, so that ``tools/train_shapes.py --text-from DIR/text_encoder
--freeze-text`` can train the UNet the same way (bundled model v3, issue 18).

- Text tower: the bundled model's 4-layer ``CLIPTextModel`` (``train_shapes.TEXT_CFG``)
  over the real CLIP tokenizer (copied from ``--tokenizer``); the text feature is the
  **pooled EOS row** (``pooler_output``: the final-layer-normed hidden state at the first
  EOS token), through a linear projection, as CLIP does.
- Image tower (not shipped): a small CNN on the generator's scenes, strided convolutions,
  then a *flattening* linear head (so the feature knows left from right, which the
  caption grammar's binding needs), then a linear projection.
- Loss: symmetric InfoNCE over the batch with a learnable temperature (CLIP's
  ``logit_scale``, initialised to 1/0.07, clamped at 100). Negatives are the other
  scenes of the batch only, as in CLIP: no hard negatives.
- Data: ``editor.scenes`` scenes and captions (``--two-object`` share of two-object
  scenes, ``--graded`` probability of a size word per object), seeds disjoint from the
  UNet's (``seed * 10_000_000 + 7_000_000 + i``) and from the held-out evaluation.

Zero-shot retrieval on held-out scenes (:func:`retrieval`), written to ``clip_log.json``:

- ``color``: one-object scene; its caption with each of the 4 colours; right if the
  true caption scores highest (chance 25%). ``shape``: the same with the 3 shapes (33%).
- ``size``: one object with a size word; ``small`` vs ``big`` in the caption (50%).
- ``binding_t2i``: two-object scene and the same scene with the two colours swapped
  (same layout, shapes, background); right if the true caption scores its own image
  higher (50%). ``binding_i2t``: the image against its caption and the swapped caption.

Output folder: ``text_encoder/`` (a ``CLIPTextModel`` folder, fp32 safetensors),
``tokenizer/``, ``clip_towers.safetensors`` (image tower, projections, temperature; tools
output only, never shipped) and ``clip_log.json``.

    python tools/train_clip.py --out clip --tokenizer assets/shapes/tokenizer --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editor import scenes  # noqa: E402
from tools.train_shapes import TEXT_CFG, cosine, fit_steps, make_dataset, to_unit  # noqa: E402

#: first scene seed of the held-out retrieval evaluation (never used for training)
EVAL_SEED = 8_100_000


class ImageTower(nn.Module):
    """Small CNN: ``image_size`` -> /8 feature map -> flattened linear head -> ``width``."""

    def __init__(self, image_size: int = 64, channels: tuple[int, ...] = (32, 64, 128, 128),
                 width: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), nn.GroupNorm(min(32, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(min(32, c), c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** (len(channels) - 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, width), nn.SiLU(),
                                  nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Clip(nn.Module):
    """The two towers, their projections into the shared space, and the temperature."""

    def __init__(self, text: nn.Module, image_size: int, embed: int = 64,
                 image_width: int = 256, tower: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        self.text = text
        self.image = ImageTower(image_size, tower, width=image_width)
        self.text_proj = nn.Linear(text.config.hidden_size, embed, bias=False)
        self.image_proj = nn.Linear(image_width, embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.text(ids).pooler_output  # the EOS row, final layer norm applied
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(x)), dim=-1)

    def loss(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, i = self.encode_text(ids), self.encode_image(x)
        logits = self.logit_scale.exp().clamp(max=100) * i @ t.T
        target = torch.arange(len(x), device=x.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def tokenize(tokenizer, captions: list[str], dev) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=int(tokenizer.model_max_length),
                     truncation=True, return_tensors="pt").input_ids.to(dev)


def _image(scene: scenes.Scene) -> np.ndarray:
    return np.asarray(scene.render()[0])


def _swap_colors(scene: scenes.Scene) -> scenes.Scene:
    a, b = scene.objects
    return scene.with_object(0, color=b.color).with_object(1, color=a.color)


@torch.no_grad()
def retrieval(model: Clip, tokenizer, dev, n: int = 128, size: int = 64,
              seed: int = EVAL_SEED) -> dict:
    """Zero-shot retrieval accuracies on held-out scenes (see the module docstring)."""
    model.eval()

    def img_feat(scs: list[scenes.Scene]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([_image(s) for s in scs])).permute(0, 3, 1, 2)
        return model.encode_image(to_unit(x.to(dev)))

    def pick(feats: torch.Tensor, options: list[list[str]]) -> list[int]:
        """Index of the best-scoring caption among each image's options."""
        out = []
        for f, opts in zip(feats, options, strict=True):
            out.append(int((model.encode_text(tokenize(tokenizer, opts, dev)) @ f).argmax()))
        return out

    res: dict = {"n": n, "first_seed": seed, "image_size": size}
    one = [scenes.random_scene(np.random.default_rng(seed + i), size=size, n_objects=1)
           for i in range(n)]
    f1 = img_feat(one)
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    got = pick(f1, [[s.with_object(0, color=c).caption() for c in colors] for s in one])
    res["color"] = float(np.mean([colors[g] == s.objects[0].color for g, s in zip(got, one, strict=True)]))
    got = pick(f1, [[s.with_object(0, shape=h).caption() for h in shapes] for s in one])
    res["shape"] = float(np.mean([shapes[g] == s.objects[0].shape for g, s in zip(got, one, strict=True)]))
    graded = [scenes.random_scene(np.random.default_rng(seed + 50_000 + i), size=size,
                                  n_objects=1, grades=(scenes.GRADES[i % 2],)) for i in range(n)]
    got = pick(img_feat(graded), [[s.with_object(0, grade=g).caption() for g in scenes.GRADES]
                                  for s in graded])
    res["size"] = float(np.mean([scenes.GRADES[g] == s.objects[0].grade
                                 for g, s in zip(got, graded, strict=True)]))
    two = [scenes.random_scene(np.random.default_rng(seed + 100_000 + i), size=size, n_objects=2)
           for i in range(n)]
    sw = [_swap_colors(s) for s in two]
    fa, fb = img_feat(two), img_feat(sw)
    ta = model.encode_text(tokenize(tokenizer, [s.caption() for s in two], dev))
    tb = model.encode_text(tokenize(tokenizer, [s.caption() for s in sw], dev))
    res["binding_t2i"] = float(((ta * fa).sum(-1) > (ta * fb).sum(-1)).float().mean())
    res["binding_i2t"] = float(((fa * ta).sum(-1) > (fa * tb).sum(-1)).float().mean())
    # plain retrieval among the n two-object scenes (chance 1/n)
    res["two_object_top1_i2t"] = float(((fa @ ta.T).argmax(1) == torch.arange(n, device=dev))
                                       .float().mean())
    model.train()
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path,
                   default=Path(__file__).resolve().parents[1] / "assets" / "shapes" / "tokenizer",
                   help="CLIPTokenizer folder to use (and copy into --out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--two-object", type=float, default=0.7)
    p.add_argument("--graded", type=float, default=0.3,
                   help="probability that an object's caption gets a size word")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed", type=int, default=64, help="width of the shared embedding")
    p.add_argument("--tower-channels", default="32,64,128,128",
                   help="image tower: channels per stage (each after the first halves the side)")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds: cap the steps by the speed of the first 200 (0: no cap)")
    p.add_argument("--eval", type=int, default=256, help="held-out scenes per retrieval test")
    args = p.parse_args(argv)

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    T0 = time.time()
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(dev)}
    if dev.type == "cuda":
        log["device_name"] = torch.cuda.get_device_name()
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out / "tokenizer")

    t = time.time()
    # seeds seed * 10M + 7M + i: disjoint from train_shapes' UNet scenes (seed * 10M + i)
    imgs, captions = make_dataset(args.dataset, args.seed, args.workers, args.two_object,
                                  args.image_size, args.graded, offset=7_000_000)
    log["data_seconds"] = time.time() - t
    print(f"clip dataset {len(imgs)} in {log['data_seconds']:.0f}s", flush=True)

    torch.manual_seed(args.seed + 11)
    cfg = dict(TEXT_CFG, max_position_embeddings=max(TEXT_CFG["max_position_embeddings"],
                                                     int(tokenizer.model_max_length)))
    text = CLIPTextModel(CLIPTextConfig(**cfg))
    tower = tuple(int(c) for c in args.tower_channels.split(","))
    model = Clip(text, args.image_size, embed=args.embed, tower=tower).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1,
                            fused=dev.type == "cuda")
    ids = tokenize(tokenizer, captions, dev)
    data = imgs.to(dev)
    g = torch.Generator(dev).manual_seed(args.seed + 12)
    losses = []
    t0 = time.time()
    total, step = args.steps, 0
    while step < total:
        total = fit_steps(step, t0, total, args.budget)
        for pg in opt.param_groups:
            pg["lr"] = args.lr * cosine(step, total, min(500, max(1, total // 10)))
        idx = torch.randint(0, len(data), (args.batch,), generator=g, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model.loss(ids[idx], to_unit(data[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == total - 1:
            losses.append([step, loss.item()])
            print(f"clip {step}/{total} loss {loss.item():.4f} temp "
                  f"{1 / model.logit_scale.exp().item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    log["steps"] = total
    log["seconds"] = time.time() - t0
    log["losses"] = losses
    model.eval()
    model.text.save_pretrained(args.out / "text_encoder", safe_serialization=True)
    from safetensors.torch import save_file

    towers = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
              if not k.startswith("text.")}
    save_file(towers, str(args.out / "clip_towers.safetensors"),
              metadata={"image_size": str(args.image_size), "embed": str(args.embed),
                        "tower_channels": args.tower_channels})
    if args.eval:
        t = time.time()
        log["retrieval"] = retrieval(model, tokenizer, dev, n=args.eval, size=args.image_size)
        log["eval_seconds"] = time.time() - t
    log["total_seconds"] = time.time() - T0
    (args.out / "clip_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("steps", "seconds", "retrieval") if k in log}, indent=1),
          flush=True)
    return log


if __name__ == "__main__":
    main()
