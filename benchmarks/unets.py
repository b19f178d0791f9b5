"""The denoiser architectures the benchmarks build with random weights (no download): the SD v1.4
and SDXL base UNets, the SD3-medium and FLUX.1 transformers; their training noise schedules; and
random conditioning of the shape each family's denoiser takes (amnesia_sd/model/families.py)."""

from __future__ import annotations

from types import SimpleNamespace

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

# The transformer of stabilityai/stable-diffusion-3-medium-diffusers (its transformer/config.json): 2.03B
# parameters, 24 joint (MMDiT) blocks 1536 wide.
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

# The transformer of stabilityai/stable-diffusion-3.5-large (its transformer/config.json): 8.1B
# parameters, 38 joint blocks 2432 wide, RMS qk-norm.
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)

# The transformer of black-forest-labs/FLUX.1-dev (its transformer/config.json): 11.9B parameters, 19
# double-stream and 38 single-stream blocks 3072 wide; latents packed in 2x2 patches (64 = 4 x 16 channels).
FLUX1_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# SD3- and Flux-shaped transformers of a few hundred thousand parameters: the step benchmark's smoke runs.
TINY_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=16,
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)

# Each family's training noise schedule, as its models' scheduler/scheduler_config.json gives it
# (family.training_scheduler builds the scheduler from it): SD v1.4's and SDXL base's DDPM schedule
# (epsilon prediction); SD3-medium's flow matching with shift 3; FLUX.1-dev's, whose shift is dynamic
# (at sampling only: its training sigmas are unshifted).
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "sd": SD_SCHEDULER, "sdxl": SD_SCHEDULER,
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096),
}

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

    return DDPMScheduler(**SD_SCHEDULER)


def family_name(config: dict) -> str:
    """The family of a denoiser of this config: Flux's transformer has single-stream blocks, SD3's
    a joint attention width, SDXL's UNet the "text_time" added embedding."""
    if "num_single_layers" in config:
        return "flux"
    if "joint_attention_dim" in config:
        return "sd3"
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def random_conditioning(config: dict, batch: int, generator: torch.Generator, image_size: int,
                        tokens: int = 77, family: str | None = None) -> dict[str, torch.Tensor]:
    """Conditioning for a denoiser of this config (of `family`, by default the config's), of the
    shapes the family's example_conditioning gives: the text part random, as encode_text gives it
    (a UNet's `tokens` long, its tokenizer's window; SD3's 77 CLIP + 256 T5 rows and Flux's 512 T5
    rows, the lengths its pipeline encodes); the image part that of an image of `image_size` pixels
    made at that size, as image_conditioning gives it: SDXL's micro-conditioning, uncropped, and
    Flux dev's guidance, 3.5 (its training scripts' guidance scale)."""
    from amnesia_sd.model.families import FAMILIES

    family = FAMILIES[family or family_name(config)]
    latent = image_size // 8
    shapes = family.example_conditioning(SimpleNamespace(**config), batch, (latent, latent), torch.float32)
    image = family.image_conditioning(family.micro_conditioning(image_size))
    cond = {}
    for key, meta in shapes.items():
        if key in image:
            cond[key] = image[key].expand(batch, *image[key].shape).clone()
            continue
        shape = list(meta.shape)
        if key == "encoder_hidden_states" and family.max_sequence_length is None:
            shape[1] = tokens  # CLIP's window, 77 for every UNet family's tokenizer
        cond[key] = torch.randn(shape, generator=generator, dtype=meta.dtype)
    return cond
