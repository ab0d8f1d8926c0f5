"""Write the config folders (no weights) that single-file loading needs offline:
``assets/configs/{sd15,sd21-v,sdxl-base}`` (installed as ``editor/assets/configs``).

Each holds ``model_index.json``, the component configs and the tokenizer configs of the
published diffusers repository it stands for (stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), written here
from their known values: every key that differs from the diffusers / transformers class
default. The scheduler is DDIM with the models' training betas (the engine samples with
DDIM built from this config). The tokenizers' vocab.json / merges.txt are not copied: they
are OpenAI CLIP's BPE vocabulary, the same as the bundled model's ``tokenizer/`` (49408
tokens), which the loader reads with these folders' special tokens (SD 2.x and SDXL's
second tokenizer pad with ``!``).

    python tools/make_model_configs.py [OUT_DIR]   # default: assets/configs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DV = "0.42.1"
SCHED = {"_class_name": "DDIMScheduler", "_diffusers_version": DV, "beta_start": 0.00085,
         "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
         "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000,
         "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None}
VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": DV, "act_fn": "silu",
       "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
UNET_SD = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DV, "act_fn": "silu",
           "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
           "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
           "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
           "norm_eps": 1e-5, "norm_num_groups": 32}
CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
          "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
          "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
          "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-5,
          "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
          "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
          "initializer_range": 0.02}


def tokenizer(pad: str) -> dict:
    return {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad,
            "model_max_length": 77, "do_lower_case": True, "add_prefix_space": False,
            "clean_up_tokenization_spaces": True, "errors": "replace"}


def index(cls: str, comps: dict, **extra) -> dict:
    out = {"_class_name": cls, "_diffusers_version": DV, "feature_extractor": [None, None],
           "image_encoder": [None, None], **extra}
    if cls == "StableDiffusionPipeline":
        out.update(safety_checker=[None, None], requires_safety_checker=False)
    out.update(comps)
    return out


SD_COMPS = {"scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

FOLDERS = {
    "sd15": {
        "model_index.json": index("StableDiffusionPipeline", SD_COMPS),
        "scheduler/scheduler_config.json": SCHED,
        "unet/config.json": {**UNET_SD, "attention_head_dim": 8, "cross_attention_dim": 768,
                             "sample_size": 64},
        "vae/config.json": VAE,
        "text_encoder/config.json": CLIP_L,
        "tokenizer/tokenizer_config.json": tokenizer("<|endoftext|>"),
    },
    "sd21-v": {
        "model_index.json": index("StableDiffusionPipeline", SD_COMPS),
        "scheduler/scheduler_config.json": {**SCHED, "prediction_type": "v_prediction"},
        "unet/config.json": {**UNET_SD, "attention_head_dim": [5, 10, 20, 20],
                             "cross_attention_dim": 1024, "sample_size": 96,
                             "use_linear_projection": True, "upcast_attention": True},
        "vae/config.json": {**VAE, "sample_size": 768},
        "text_encoder/config.json": {**CLIP_L, "hidden_act": "gelu", "hidden_size": 1024,
                                     "intermediate_size": 4096, "num_attention_heads": 16,
                                     "num_hidden_layers": 23, "projection_dim": 512},
        "tokenizer/tokenizer_config.json": tokenizer("!"),
    },
    "sdxl-base": {
        "model_index.json": index(
            "StableDiffusionXLPipeline",
            {**SD_COMPS, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]},
            force_zeros_for_empty_prompt=True),
        "scheduler/scheduler_config.json": SCHED,
        "unet/config.json": {
            **UNET_SD, "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
            "use_linear_projection": True, "sample_size": 128},
        "vae/config.json": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                            "force_upcast": True},
        "text_encoder/config.json": CLIP_L,
        "text_encoder_2/config.json": {
            **CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
            "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
            "num_hidden_layers": 32, "projection_dim": 1280},
        "tokenizer/tokenizer_config.json": tokenizer("<|endoftext|>"),
        "tokenizer_2/tokenizer_config.json": tokenizer("!"),
    },
}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "assets" / "configs"
    for name, files in FOLDERS.items():
        for rel, data in files.items():
            path = out / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {', '.join(FOLDERS)} under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
