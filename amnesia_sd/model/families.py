"""Model families: the one place that knows Stable Diffusion 1.x/2.x from SDXL.

A family says which diffusers pipeline class loads and generates, and turns prompts into the
denoiser's conditioning. Conditioning is a dict of batch-first tensors, split in two parts:

- the text part, one row per prompt (`encoder_hidden_states`; SDXL adds the pooled `text_embeds`);
- the image part, one row per image (SDXL's micro-conditioning `time_ids`: original size, crop
  top-left, target size), stored with each image set's latents, so training conditions every image
  exactly as it was made.

`predict` hands both to the denoiser. The training loop, the Fisher and the image sets only ever
index, concatenate and pass these dicts, so a family with another denoiser or objective (SD3, Flux:
a transformer, flow matching) comes in here without touching them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amnesia_sd.core.errors import UserError

Conditioning = dict[str, torch.Tensor]


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

    def empty_prompt_is_unconditional(self, pipe) -> bool:
        """The pipeline's unconditional branch encodes "" (what --unconditional-replay trains)."""
        return True

    def beyond_window(self, pipe, prompt: str) -> str:
        """The end of `prompt` that the text encoders never see (CLIP reads 77 tokens), or ''."""
        tokenizer = getattr(pipe, self.tokenizers[-1])
        ids = tokenizer(prompt, truncation=False).input_ids  # with the start and end tokens
        limit = tokenizer.model_max_length
        return tokenizer.decode(ids[limit - 1 : -1]).strip() if len(ids) > limit else ""

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

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
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        encoder = pipe.text_encoder
        mask = ids.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
        return {"encoder_hidden_states": encoder(ids.input_ids.to(encoder.device), attention_mask=mask)[0]}

    def micro_conditioning(self, size: int, original: tuple[int, int] | None = None,
                           crop: tuple[int, int] = (0, 0)) -> dict:
        """Keyword arguments of the pipeline call that shape one image (none for SD 1.x/2.x)."""
        return {}

    def image_conditioning(self, micro: dict) -> Conditioning:
        """One image's rows of the image part, from its micro-conditioning."""
        return {}

    def example_conditioning(self, config, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> Conditioning:
        """Conditioning of the shapes a denoiser of this `config` takes, on the meta device (memory.py)."""
        return {"encoder_hidden_states": torch.zeros((batch, 77, config.cross_attention_dim), device="meta", dtype=dtype)}

    def predict(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
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
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
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

    def image_conditioning(self, micro: dict) -> Conditioning:
        ids = [*micro["original_size"], *micro["crops_coords_top_left"], *micro["target_size"]]
        return {"time_ids": torch.tensor(ids, dtype=torch.float32)}


def check_unconditional_replay(family: StableDiffusion, pipe, share: float | None) -> None:
    """--unconditional-replay trains the empty prompt's conditioning: only where sampling uses it."""
    if share and not family.empty_prompt_is_unconditional(pipe):
        raise UserError(f"--unconditional-replay is not supported on this {family.title} pipeline: it has "
                        "force_zeros_for_empty_prompt=True, so its unconditional branch is zero embeddings, not the "
                        "empty prompt, and replaying the empty prompt would not hold it; leave the flag out, or use "
                        "a pipeline saved with force_zeros_for_empty_prompt=False (in its model_index.json), which "
                        "accepts it")


FAMILIES = {f.name: f for f in (StableDiffusion(), StableDiffusionXL())}
SUPPORTED = "Stable Diffusion 1.x/2.x and SDXL base pipelines"


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
    if name.startswith("StableDiffusion") and not name.startswith(("StableDiffusion3", "StableDiffusionXL")) \
            and "text_encoder" in index and "unet" in index:
        return FAMILIES["sd"]
    raise UserError(f"{where} is a {name or 'pipeline of unknown class'}: amnesia-sd takes {SUPPORTED}")


def family_of_keys(keys) -> StableDiffusion:
    """The family of an original-layout single-file checkpoint, from its tensor names: SDXL's
    conditioner holds two text encoders, SD 1.x/2.x's cond_stage_model one."""
    keys = list(keys)
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
