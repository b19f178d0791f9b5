"""Model families: the one place that knows Stable Diffusion 1.x/2.x, SDXL, SD 3/3.5 and FLUX.1 apart.

A family says which diffusers pipeline class loads and generates, which module is the denoiser (a
UNet, or SD3's and Flux's transformers), what it is trained to predict (epsilon or v by DDPM
noising; the flow-matching velocity), and turns prompts into the denoiser's conditioning.
Conditioning is a dict of batch-first tensors, split in two parts:

- the text part, one row per prompt (`encoder_hidden_states`; SDXL, SD3 and Flux add a pooled
  text embedding);
- the image part, one row per image (SDXL's micro-conditioning `time_ids`: original size, crop
  top-left, target size; Flux dev's embedded guidance), stored with each image set's latents, so
  training conditions every image exactly as it was made.

`predict` hands both to the denoiser. The training loop, the Fisher and the image sets only ever
index, concatenate and pass these dicts and call the family's objective (diffusion.py), so they
are one piece of code for every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from amnesia_sd.core.errors import UserError

Conditioning = dict[str, torch.Tensor]


def padded(tokenizer, prompts: list[str], length: int):
    """The prompts' token ids (with the special tokens) as every pipeline's encode_prompt makes them:
    cut or padded to `length`."""
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


class StableDiffusion:
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden state; epsilon or v-prediction."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    img2img_pipeline = "StableDiffusionImg2ImgPipeline"  # attack's partial denoising
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)  # each text encoder's, in the same order
    # How a textual-inversion file names each text encoder's vectors; None: by the token itself
    # ({token: [n, dim]}, one text encoder).
    embedding_keys: tuple[str, ...] | None = None
    image_keys: tuple[str, ...] = ()  # the image part's keys
    denoiser = "unet"  # the pipeline's module that training changes
    objective = "diffusion"  # DDPM noising, the scheduler's prediction_type (diffusion.py)
    sampler: str | None = "DDIMScheduler"  # image sets sample with DDIM (the paper's); None: the pipeline's own
    training_scheduler_class = "DDPMScheduler"
    lora_layers = "unet_lora_layers"  # save_lora_weights' argument for the denoiser's adapters
    # The text encoder windows the pipeline reads (CLIP: 77 tokens); T5's is the pipeline call's
    # max_sequence_length, passed to it so that sampling and training see the same rows.
    max_sequence_length: int | None = None
    unconditional_guidance = True  # sampling runs a negative branch (classifier-free guidance)
    no_unconditional_replay = ""  # why --unconditional-replay is refused where the empty prompt is not unconditional

    def empty_prompt_is_unconditional(self, pipe) -> bool:
        """The pipeline's unconditional branch encodes "" (what --unconditional-replay trains)."""
        return True

    def window(self, pipe) -> int:
        """The most tokens of a prompt any text encoder reads (CLIP: 77; with T5: max_sequence_length)."""
        return self.max_sequence_length or getattr(pipe, self.tokenizers[-1]).model_max_length

    def beyond_window(self, pipe, prompt: str) -> str:
        """The end of `prompt` that no text encoder sees, or ''."""
        tokenizer, limit = getattr(pipe, self.tokenizers[-1], None), self.window(pipe)
        if tokenizer is None:  # SD3 without T5: CLIP's window
            tokenizer = pipe.tokenizer
            limit = tokenizer.model_max_length
        ids = tokenizer(prompt, truncation=False).input_ids  # with the start and end tokens (T5: the end)
        return tokenizer.decode(ids[limit - 1 : -1]).strip() if len(ids) > limit else ""

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def sample_with(self, pipe) -> None:
        """Give `pipe` the scheduler image sets are sampled with (DDIM; flow matching: keep its own)."""
        if self.sampler:
            import diffusers

            pipe.scheduler = getattr(diffusers, self.sampler).from_config(pipe.scheduler.config)

    def training_scheduler(self, config):
        """The noise scheduler training, the Fisher and the attacks corrupt latents with (a fresh one:
        a sampler's timesteps change with set_timesteps)."""
        import diffusers

        return getattr(diffusers, self.training_scheduler_class).from_config(config)

    def prediction_type(self, pipe) -> str:
        return pipe.scheduler.config.prediction_type

    def draw_timesteps(self, scheduler, count: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps (indices into the scheduler's num_train_timesteps), drawn as the
        family's diffusers training scripts draw them: uniformly for DDPM."""
        return torch.randint(scheduler.config.num_train_timesteps, (count,), generator=generator)

    def timestep_weights(self, scheduler) -> torch.Tensor:
        """N x the probability that draw_timesteps gives each index: the Fisher sums the loss over
        a grid of indices weighted by it, so it is the expectation training samples from."""
        return torch.ones(scheduler.config.num_train_timesteps)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of every generating call besides the settings (T5's window)."""
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

    def denoiser_of(self, pipe):
        return getattr(pipe, self.denoiser)

    def native_resolution(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def size_multiple(self, pipe) -> int:
        """Image sides the pipeline takes: SD's and SDXL's multiples of 8, and the VAE's factor."""
        return math.lcm(8, pipe.vae_scale_factor)

    def latent_channels(self, config) -> int:
        """The latents' channels for a denoiser of this `config` (Flux's takes 2x2 patches packed)."""
        return config.in_channels

    def blocks(self, denoiser) -> list:
        """The denoiser's blocks that gradient checkpointing recomputes (memory.py measures them)."""
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def latents_of(self, pipe, output: torch.Tensor, size: int) -> torch.Tensor:
        """The pipeline's output_type="latent" as [batch, channels, h, w] scaled latents."""
        return output

    def img2img(self, pipe):
        """The family's image-to-image pipeline on `pipe`'s modules (shared, not copied)."""
        import diffusers

        return getattr(diffusers, self.img2img_pipeline).from_pipe(pipe)

    def check(self, pipe) -> None:
        """A loaded pipeline is one this family can condition."""

    def loaded_text_encoders(self, pipe) -> list:
        """The pipeline's text encoder modules (a pipeline may lack one, e.g. SDXL's first)."""
        return [getattr(pipe, name) for name in self.text_encoders if getattr(pipe, name, None) is not None]

    def text_parts(self) -> list[tuple[str, str]]:
        """(tokenizer, text encoder) attribute names of the family's pipelines, in order."""
        return list(zip(self.tokenizers, self.text_encoders))

    @torch.no_grad()
    def encode_text(self, pipe, prompts: list[str]) -> Conditioning:
        """The text part of the conditioning, without gradients (the text encoder is frozen)."""
        return self.text_conditioning(pipe, prompts)

    def text_conditioning(self, pipe, prompts: list[str]) -> Conditioning:
        """As StableDiffusionPipeline.encode_prompt: last hidden state, padded to max length.
        Differentiable: `attack` trains a token's embedding through it."""
        ids = padded(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
        encoder = pipe.text_encoder
        mask = ids.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
        return {"encoder_hidden_states": encoder(ids.input_ids.to(encoder.device), attention_mask=mask)[0]}

    def micro_conditioning(self, size: int, original: tuple[int, int] | None = None,
                           crop: tuple[int, int] = (0, 0)) -> dict:
        """Keyword arguments of the pipeline call that shape one image (none for SD 1.x/2.x)."""
        return {}

    def image_conditioning(self, micro: dict, guidance: float | None = None) -> Conditioning:
        """One image's rows of the image part, from its micro-conditioning and the guidance scale it
        was made with (None: the user's own images)."""
        return {}

    def example_conditioning(self, config, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> Conditioning:
        """Conditioning of the shapes a denoiser of this `config` takes, on the meta device (memory.py)."""
        return {"encoder_hidden_states": torch.zeros((batch, 77, config.cross_attention_dim), device="meta", dtype=dtype)}

    def predict(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output for latents [batch, channels, h, w] at the model's timesteps."""
        added = {k: v.to(noisy.dtype) for k, v in cond.items() if k != "encoder_hidden_states"}
        return unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=added or None).sample


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP text encoders' penultimate hidden states side by side, the second's pooled
    projection, and six time ids (original size, crop top-left, target size) per image."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline = "StableDiffusionXLPipeline"
    img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    embedding_keys = ("clip_l", "clip_g")  # the layout of SDXL textual-inversion files
    image_keys = ("time_ids",)

    no_unconditional_replay = (
        "it has force_zeros_for_empty_prompt=True, so its unconditional branch is zero embeddings, not the empty "
        "prompt, and replaying the empty prompt would not hold it; leave the flag out, or use a pipeline saved with "
        "force_zeros_for_empty_prompt=False (in its model_index.json), which accepts it")

    def empty_prompt_is_unconditional(self, pipe) -> bool:
        """With force_zeros_for_empty_prompt (the base model's default) the unconditional branch is zero
        embeddings, not the empty prompt's: replaying "" would train a conditioning sampling never uses."""
        return not pipe.config.force_zeros_for_empty_prompt

    def check(self, pipe) -> None:
        """The UNet's added embedding must take six time ids and the pooled projection (the base;
        the refiner takes an aesthetic score instead)."""
        config = pipe.unet.config
        passed = 6 * config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
        expected = pipe.unet.add_embedding.linear_1.in_features
        if config.addition_embed_type != "text_time" or passed != expected:
            raise UserError(f"this SDXL UNet's added conditioning takes {expected} values, not the base model's "
                            f"{passed} (six time ids and the pooled text): only SDXL base models are supported, "
                            "not the refiner")

    def text_conditioning(self, pipe, prompts: list[str]) -> Conditioning:
        """As StableDiffusionXLPipeline.encode_prompt (clip_skip None, no LoRA scale)."""
        pairs = [(getattr(pipe, tokenizer), getattr(pipe, encoder)) for tokenizer, encoder in self.text_parts()]
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            if encoder is None:  # a pipeline without the first encoder runs on the second alone
                continue
            ids = padded(tokenizer, prompts, tokenizer.model_max_length).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (text_encoder_2)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def example_conditioning(self, config, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> Conditioning:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {**super().example_conditioning(config, batch, latent, dtype),
                "text_embeds": torch.zeros((batch, pooled), device="meta", dtype=dtype),
                "time_ids": torch.zeros((batch, 6), device="meta", dtype=dtype)}

    def micro_conditioning(self, size: int, original: tuple[int, int] | None = None,
                           crop: tuple[int, int] = (0, 0)) -> dict:
        """Generated images: original = target = the size made, no crop (the pipeline's default);
        the user's own images: their size before resizing and where the crop began."""
        return {"original_size": tuple(original or (size, size)), "crops_coords_top_left": tuple(crop),
                "target_size": (size, size)}

    def image_conditioning(self, micro: dict, guidance: float | None = None) -> Conditioning:
        ids = [*micro["original_size"], *micro["crops_coords_top_left"], *micro["target_size"]]
        return {"time_ids": torch.tensor(ids, dtype=torch.float32)}


class FlowMatching(StableDiffusion):
    """What SD 3/3.5 and FLUX.1 share: a transformer trained by flow matching. x_t = (1 - sigma) x0 +
    sigma noise, the target noise - x0; timesteps drawn by `weighting_scheme` and the loss weighted
    by it, with diffusers' own compute_density_for_timestep_sampling and
    compute_loss_weighting_for_sd3, as its SD3 and Flux training scripts do; the scheduler's
    training timesteps carry its shift (none for Flux, whose shift is dynamic at sampling)."""

    denoiser = "transformer"
    objective = "flow"
    sampler = None  # the pipeline's flow-matching Euler sampler, with its shift
    training_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_layers = "transformer_lora_layers"
    weighting_scheme = "none"
    logit_mean, logit_std, mode_scale = 0.0, 1.0, 1.29  # the scripts' defaults

    def prediction_type(self, pipe) -> str:
        return "flow_matching"

    def draw_timesteps(self, scheduler, count: int, generator: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        n = scheduler.config.num_train_timesteps
        u = compute_density_for_timestep_sampling(self.weighting_scheme, count, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)
        return (u * n).long().clamp(0, n - 1)

    def timestep_weights(self, scheduler) -> torch.Tensor:
        n = scheduler.config.num_train_timesteps
        if self.weighting_scheme != "logit_normal":  # "none": uniform
            return torch.ones(n)
        edges = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        z = (torch.log(edges) - torch.log1p(-edges) - self.logit_mean) / self.logit_std
        return (n * torch.diff(0.5 * (1 + torch.erf(z / math.sqrt(2))))).float()

    def native_resolution(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def check(self, pipe) -> None:
        """The scheduler must be a flow-matching one: training corrupts latents as it samples them."""
        if not type(pipe.scheduler).__name__.startswith("FlowMatch"):
            raise UserError(f"this {self.title} pipeline's scheduler is {type(pipe.scheduler).__name__}, not the "
                            "flow-matching scheduler its transformer was trained with: load it with its own scheduler")

    def t5_conditioning(self, text, tokenizer: str, encoder: str, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden state over max_sequence_length tokens, as the pipelines' _get_t5_prompt_embeds."""
        tokenizer, encoder = getattr(text, tokenizer), getattr(text, encoder)
        ids = padded(tokenizer, prompts, self.max_sequence_length).input_ids
        return encoder(ids.to(encoder.device))[0]


class StableDiffusion3(FlowMatching):
    """SD 3 / 3.5: two CLIP encoders' penultimate states side by side, zero-padded to T5's width and
    followed by T5's states; their two pooled projections side by side. An MMDiT transformer on 2x2
    patches, timesteps drawn logit-normally (the SD3 script's default)."""

    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    pipeline = "StableDiffusion3Pipeline"
    img2img_pipeline = "StableDiffusion3Img2ImgPipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    embedding_keys = ("clip_l", "clip_g", "t5")
    max_sequence_length = 256  # StableDiffusion3Pipeline's default
    weighting_scheme = "logit_normal"

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def blocks(self, denoiser) -> list:
        return list(denoiser.transformer_blocks)

    def text_conditioning(self, pipe, prompts: list[str]) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip None; one prompt for all three
        encoders; without T5, its zeros)."""
        hidden, pooled = [], []
        for tokenizer, encoder in list(self.text_parts())[:2]:
            tokenizer, encoder = getattr(pipe, tokenizer), getattr(pipe, encoder)
            ids = padded(tokenizer, prompts, pipe.tokenizer.model_max_length).input_ids  # the first's, for both
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        if getattr(pipe, "text_encoder_3", None) is None:
            t5 = torch.zeros((len(prompts), self.max_sequence_length, pipe.transformer.config.joint_attention_dim),
                             device=clip.device, dtype=clip.dtype)
        else:
            t5 = self.t5_conditioning(pipe, "tokenizer_3", "text_encoder_3", prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def example_conditioning(self, config, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> Conditioning:
        return {"encoder_hidden_states": torch.zeros((batch, 77 + self.max_sequence_length, config.joint_attention_dim),
                                                     device="meta", dtype=dtype),
                "pooled_projections": torch.zeros((batch, config.pooled_projection_dim), device="meta", dtype=dtype)}

    def predict(self, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer(hidden_states=noisy, timestep=timesteps.expand(len(noisy)),
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"].to(noisy.dtype)).sample


class Flux(FlowMatching):
    """FLUX.1 dev and schnell: CLIP's pooled output and T5's states; latents packed in 2x2 patches
    with position ids for the image and the text; dev embeds the guidance scale an image was made
    with (an image-part row here), schnell has no guidance. Uniform timesteps (the Flux script's
    default weighting "none")."""

    name = "flux"
    title = "FLUX.1"
    pipeline = "FluxPipeline"
    img2img_pipeline = "FluxImg2ImgPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    embedding_keys = ("clip_l", "t5")
    image_keys = ("guidance",)
    max_sequence_length = 512  # FluxPipeline's default
    unconditional_guidance = False  # guidance-distilled: one pass per step, no negative branch
    training_guidance = 3.5  # diffusers' Flux training scripts' --guidance_scale, for the user's own images

    no_unconditional_replay = ("it is guidance-distilled and samples without a negative branch, so no step runs the "
                               "empty prompt as an unconditional one; leave the flag out")

    def empty_prompt_is_unconditional(self, pipe) -> bool:
        """Flux samples without a negative branch: no step ever runs the empty prompt as one."""
        return False

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def blocks(self, denoiser) -> list:
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def latent_channels(self, config) -> int:
        return config.in_channels // 4

    def latents_of(self, pipe, output: torch.Tensor, size: int) -> torch.Tensor:
        return self.pipeline_class()._unpack_latents(output, size, size, pipe.vae_scale_factor)

    def text_conditioning(self, pipe, prompts: list[str]) -> Conditioning:
        """As FluxPipeline.encode_prompt (one prompt for both encoders)."""
        ids = padded(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length).input_ids
        pooled = pipe.text_encoder(ids.to(pipe.text_encoder.device), output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": self.t5_conditioning(pipe, "tokenizer_2", "text_encoder_2", prompts),
                "pooled_projections": pooled}

    def image_conditioning(self, micro: dict, guidance: float | None = None) -> Conditioning:
        return {"guidance": torch.tensor(self.training_guidance if guidance is None else guidance, dtype=torch.float32)}

    def example_conditioning(self, config, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> Conditioning:
        return {"encoder_hidden_states": torch.zeros((batch, self.max_sequence_length, config.joint_attention_dim),
                                                     device="meta", dtype=dtype),
                "pooled_projections": torch.zeros((batch, config.pooled_projection_dim), device="meta", dtype=dtype),
                "guidance": torch.zeros((batch,), device="meta", dtype=torch.float32)}

    def predict(self, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """As FluxPipeline's denoising step: packed latents, position ids, the timestep / 1000."""
        pipeline = self.pipeline_class()
        b, c, h, w = noisy.shape
        packed = pipeline._pack_latents(noisy, b, c, h, w)
        image_ids = pipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text = cond["encoder_hidden_states"]
        text_ids = torch.zeros((text.shape[1], 3), device=noisy.device, dtype=noisy.dtype)
        guidance = cond["guidance"].float() if transformer.config.guidance_embeds else None
        out = transformer(hidden_states=packed, timestep=(timesteps / 1000).expand(b).to(noisy.dtype),
                          guidance=guidance, pooled_projections=cond["pooled_projections"].to(noisy.dtype),
                          encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids).sample
        # the inverse of _pack_latents, in latent units (_unpack_latents takes the size in pixels)
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def check_unconditional_replay(family: StableDiffusion, pipe, share: float | None) -> None:
    """--unconditional-replay trains the empty prompt's conditioning: only where sampling uses it."""
    if share and not family.empty_prompt_is_unconditional(pipe):
        raise UserError(f"--unconditional-replay is not supported on this {family.title} pipeline: "
                        + family.no_unconditional_replay)


FAMILIES = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
SUPPORTED = "Stable Diffusion 1.x/2.x, SDXL base, SD 3/3.5 and FLUX.1 pipelines"


def family_of(pipe) -> StableDiffusion:
    """The family of a loaded pipeline."""
    for family in FAMILIES.values():
        if type(pipe).__name__ == family.pipeline:
            return family
    raise UserError(f"{type(pipe).__name__} is not supported: amnesia-sd takes {SUPPORTED}")


def family_of_index(index: dict, where: str) -> StableDiffusion:
    """The family named by a pipeline's model_index.json."""
    name = index.get("_class_name", "")
    if index.get("requires_aesthetics_score"):
        raise UserError(f"{where} is an SDXL refiner ({name}): amnesia-sd takes {SUPPORTED}")
    if name.startswith("StableDiffusionXL") and "text_encoder_2" in index:
        return FAMILIES["sdxl"]
    if name in ("StableDiffusion3Pipeline", "FluxPipeline") and "transformer" in index:
        return FAMILIES["sd3" if name.startswith("StableDiffusion3") else "flux"]
    if name.startswith("StableDiffusion") and not name.startswith(("StableDiffusion3", "StableDiffusionXL")) \
            and "text_encoder" in index and "unet" in index:
        return FAMILIES["sd"]
    raise UserError(f"{where} is a {name or 'pipeline of unknown class'}: amnesia-sd takes {SUPPORTED}")


def family_of_keys(keys) -> StableDiffusion:
    """The family of an original-layout single-file checkpoint, from its tensor names: SD3's MMDiT has
    joint_blocks, Flux's double_blocks; SDXL's conditioner holds two text encoders, SD 1.x/2.x's
    cond_stage_model one."""
    keys = list(keys)
    for family, block in (("sd3", "joint_blocks."), ("flux", "double_blocks.")):
        if any(k.startswith((block, "model.diffusion_model." + block)) for k in keys):
            return FAMILIES[family]
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return FAMILIES["sdxl"]
    if any(k.startswith("conditioner.") for k in keys):
        raise UserError(f"this checkpoint looks like an SDXL refiner: amnesia-sd takes {SUPPORTED}")
    return FAMILIES["sd"]


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint without reading its weights (safetensors), or
    through torch's safe loader for legacy .ckpt files; [] when they cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return list(state.get("state_dict", state)) if isinstance(state, dict) else []
    except Exception:  # unreadable: the loader's own error says why, with the file named
        return []


def detect_family(kind: str, location: str) -> StableDiffusion:
    """The family of a model before it loads: model_index.json for folders and hub ids (read from
    the Hugging Face cache when offline), the tensor names for single files."""
    if kind == "file":
        return family_of_keys(checkpoint_keys(Path(location)))
    if kind == "folder":
        index = json.loads((Path(location) / "model_index.json").read_text())
    else:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(location)
    return family_of_index(index, location)


def take(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    return {k: v[index] for k, v in cond.items()}


def join(*parts: Conditioning) -> Conditioning:
    """Rows of several conditionings after one another (surrogate batch, then replay batch)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def expand(cond: Conditioning, count: int) -> Conditioning:
    """One sample's conditioning repeated `count` times (as views)."""
    return {k: v.expand(count, *v.shape[1:]) for k, v in cond.items()}


def to_device(cond: Conditioning, device) -> Conditioning:
    return {k: v.to(device) for k, v in cond.items()}
