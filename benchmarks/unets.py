"""The UNet architectures the benchmarks build with random weights (no download), and random
conditioning of the shape each family's denoiser takes (amnesia_sd/families.py)."""

from __future__ import annotations

import torch

# The UNet of CompVis/stable-diffusion-v1-4 (its unet/config.json).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

# The UNet of stabilityai/stable-diffusion-xl-base-1.0 (its unet/config.json).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,  # 6 time ids x 256 + the 1280 pooled text
)

# SD-shaped and SDXL-shaped UNets of a few hundred thousand parameters: the benchmarks' smoke runs.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
)
TINY_SDXL_POOLED_DIM = 24
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=64,  # two 32-wide text encoders side by side
    attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_SDXL_POOLED_DIM,
)


def sd_scheduler():
    """SD v1.4's and SDXL base's training noise schedule (epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def random_conditioning(config: dict, batch: int, generator: torch.Generator, image_size: int,
                        tokens: int = 77) -> dict[str, torch.Tensor]:
    """Random text conditioning for a UNet of this config, as families.py's encode_text gives it;
    a "text_time" (SDXL) UNet also gets its pooled text and the micro-conditioning of an image of
    `image_size` pixels made at that size, uncropped (the image part, as image_conditioning gives)."""
    cond = {"encoder_hidden_states": torch.randn((batch, tokens, config["cross_attention_dim"]), generator=generator)}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond["text_embeds"] = torch.randn((batch, pooled), generator=generator)
        size = [image_size, image_size]
        cond["time_ids"] = torch.tensor([size + [0, 0] + size] * batch, dtype=torch.float32)
    return cond
