"""A tiny Stable-Diffusion-shaped pipeline built in code, offline (no hub, no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from amnesia_sd.model.tokenizer import write_word_tokenizer

WORDS = "a an the photo of portrait painting picture brad pitt middle aged man woman dog cat house tree in on".split()


def build_tiny_pipeline(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Same classes and layout as SD v1.x, a few hundred thousand parameters."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab"), max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _two_clip_tokenizers(path: Path):
    """The two CLIP tokenizers of SDXL- and SD3-shaped pipelines, and their text encoders' shared config."""
    tokenizer = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab"), max_length=16)
    tokenizer_2 = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab-2"), max_length=16)
    common = dict(vocab_size=len(tokenizer), intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, tokenizer_2, common


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Same classes and layout as SDXL base: two CLIP text encoders (the second with a projection),
    a UNet with text_time added conditioning, a VAE that asks to be upcast in fp16."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2, common = _two_clip_tokenizers(path)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=24, **common))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + 24,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _tiny_flow_vae(latent_channels: int) -> AutoencoderKL:
    """A VAE with a shift factor, as SD3's and Flux's: latents are (x - shift) * scale."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=1.5035, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _tiny_t5(path: Path, name: str, d_model: int):
    from transformers import T5Config, T5EncoderModel

    from amnesia_sd.model.tokenizer import write_word_t5_tokenizer

    tokenizer = write_word_t5_tokenizer(WORDS, path.with_name(path.name + f"-{name}"), max_length=24)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                      eos_token_id=1, decoder_start_token_id=0))
    return tokenizer, encoder


def build_tiny_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Same classes and layout as SD 3 / 3.5: two CLIP text encoders with projections, T5, an MMDiT
    transformer (SD3Transformer2DModel) on 2x2 patches, a flow-matching scheduler with SD3's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2, common = _two_clip_tokenizers(path)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=16, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=16, **common))
    tokenizer_3, text_encoder_3 = _tiny_t5(path, "t5", d_model=64)  # as wide as the two CLIPs side by side
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(4), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux_pipeline(path: str | Path, guidance: bool = True, seed: int = 0) -> Path:
    """Same classes and layout as FLUX.1 dev (`guidance`: its guidance embedding) or schnell: CLIP's
    pooled output and T5, a FluxTransformer2DModel on packed 2x2 latents, a flow-matching scheduler
    with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab"), max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    tokenizer_2, text_encoder_2 = _tiny_t5(path, "t5", d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(4), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
