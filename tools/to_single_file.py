"""Write a diffusers Stable Diffusion folder as one original-layout single-file checkpoint.

The layout is the one A1111, ComfyUI and diffusers' ``from_single_file`` read: the UNet
under ``model.diffusion_model.`` (LDM ``input_blocks`` / ``middle_block`` /
``output_blocks``), the VAE under ``first_stage_model.``, and the text encoder(s) as the
original trainers saved them (SD 1.x: ``cond_stage_model.transformer.`` in Hugging Face
CLIP layout; SD 2.x: ``cond_stage_model.model.`` in OpenCLIP layout; SDXL:
``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.``).

The mapping is the inverse of diffusers' own LDM -> diffusers conversion
(``diffusers.loaders.single_file_utils``), written for any number of UNet/VAE levels and
layers per block (read from the component configs), so the bundled 3-level model
converts as well as SD 1.5. The same mapping as diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalised.

    python tools/to_single_file.py assets/shapes shapes.safetensors [--dtype float16]

Load it back with ``pivot-edit ... --model shapes.safetensors --config assets/shapes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM ``UNetModel`` keys."""
    lpb = int(config["layers_per_block"])
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, t in sd.items():
        p = key.split(".")
        if p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
                new = f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op." + ".".join(p[5:])
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                idx = 1 + i * (lpb + 1) + j
                new = (f"input_blocks.{idx}.0.{_sub(rest, _RESNET)}" if kind == "resnets"
                       else f"input_blocks.{idx}.1.{rest}")
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.*
                new = (f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attn[i] else 1}.conv."
                       + ".".join(p[5:]))
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                idx = i * (lpb + 1) + j
                new = (f"output_blocks.{idx}.0.{_sub(rest, _RESNET)}" if kind == "resnets"
                       else f"output_blocks.{idx}.1.{rest}")
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
            new = (f"middle_block.{2 * j}.{_sub(rest, _RESNET)}" if kind == "resnets"
                   else f"middle_block.1.{rest}")
        else:
            new = _sub(key, top)
            if new == key:
                raise ValueError(f"unet tensor {key!r} has no original-layout name")
        out["model.diffusion_model." + new] = t
    return out


def vae_to_original(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM ``AutoencoderKL`` keys (attention
    projections as 1x1 convolutions, as the original checkpoints store them)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, t in sd.items():
        p = key.split(".")
        side = p[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            level = i if p[1] == "down_blocks" else levels - 1 - i
            name = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                new = f"{side}.{name}.{level}.block.{p[4]}." + _sub(".".join(p[5:]),
                                                                    {"conv_shortcut": "nin_shortcut"})
            else:  # downsamplers / upsamplers .0.conv.*
                new = f"{side}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.conv." \
                      + ".".join(p[6:])
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{side}.mid.block_{int(p[3]) + 1}." + _sub(".".join(p[4:]),
                                                                  {"conv_shortcut": "nin_shortcut"})
            else:
                new = f"{side}.mid.attn_1." + _sub(".".join(p[4:]), _VAE_ATTN)
                if t.ndim == 2:
                    t = t[:, :, None, None]
        elif p[1] == "conv_norm_out":
            new = f"{side}.norm_out.{p[2]}"
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        else:
            raise ValueError(f"vae tensor {key!r} has no original-layout name")
        out["first_stage_model." + new] = t
    return out


def clip_to_original(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text model -> ``prefix`` + ``text_model.*`` (SD 1.x, SDXL's first)."""
    out = {}
    for key, t in sd.items():
        if key == "text_projection.weight":
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = t
    return out


def clip_to_open_clip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text model -> OpenCLIP layout (SD 2.x; SDXL's second encoder):
    q/k/v concatenated into ``in_proj``, ``text_projection`` transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out, qkv = {}, {}
    top = {"embeddings.position_embedding.weight": "positional_embedding",
           "embeddings.token_embedding.weight": "token_embedding.weight",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for key, t in sd.items():
        if key in top:
            out[prefix + top[key]] = t
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
        elif key.startswith("encoder.layers."):
            p = key.split(".")
            n, rest = p[2], ".".join(p[3:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                which, kind = rest.split(".")[1], rest.split(".")[2]
                qkv.setdefault((n, kind), {})[which] = t
                continue
            out[f"{prefix}transformer.resblocks.{n}.{_sub(rest, inner)}"] = t
        else:
            raise ValueError(f"text encoder tensor {key!r} has no OpenCLIP name")
    for (n, kind), parts in qkv.items():
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}transformer.resblocks.{n}.attn.{name}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def _component(folder: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    sub = folder / name
    if not sub.is_dir():
        return None
    cfg = json.loads((sub / "config.json").read_text())
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{sub} has no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return cfg, sd


def folder_to_original(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers SD 1.x / 2.x / SDXL folder, in original layout."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet = _component(folder, "unet")
    vae = _component(folder, "vae")
    te = _component(folder, "text_encoder")
    if unet is None or vae is None or te is None:
        raise ValueError(f"{folder} lacks a unet, vae or text_encoder folder")
    out = unet_to_original(unet[1], unet[0])
    out.update(vae_to_original(vae[1], vae[0]))
    te2 = _component(folder, "text_encoder_2")
    if te2 is not None or "XL" in index.get("_class_name", ""):
        if te2 is None:
            raise ValueError(f"{folder} is an SDXL folder without text_encoder_2")
        out.update(clip_to_original(te[1], "conditioner.embedders.0.transformer."))
        out.update(clip_to_open_clip(te2[1], "conditioner.embedders.1.model."))
    elif te[0].get("hidden_act") == "gelu":  # OpenCLIP-trained (SD 2.x)
        out.update(clip_to_open_clip(te[1], "cond_stage_model.model."))
    else:
        out.update(clip_to_original(te[1], "cond_stage_model.transformer."))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="diffusers model folder (with model_index.json)")
    ap.add_argument("out", help="the .safetensors file to write")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="cast floating-point tensors (default: keep the stored dtype)")
    args = ap.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        ap.error("the output must be a .safetensors file")
    sd = folder_to_original(args.folder)
    if args.dtype:
        dt = getattr(torch, args.dtype)
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, args.out, metadata={"format": "pt", "converted_by": "pivot-edit to_single_file"})
    print(f"wrote {args.out}: {len(sd)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
