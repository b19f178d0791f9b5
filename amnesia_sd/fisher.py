"""The diagonal Fisher information of the base UNet (METHOD.md):

    F_i = (1/N) sum_n ( d/dtheta_i sum_{t in T} L_t(x_n, c_n) )^2

x_n are latents the base model generated from the replay prompts c_n. The sum over t is evaluated
in batched chunks of timesteps of one sample: the gradient of the sum is the sum of the chunks'
gradients, so chunking changes speed, never the result. Each sample's noise comes from a generator
seeded by the run's seed and the sample's index, so neither batching nor sharding changes F.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .cost import first_batch
from .diffusion import encode_prompts, per_sample_loss
from .errors import UserError
from .generate import image_seed
from .io import write_safetensors
from .models import DTYPES, unet_config_hash
from .paths import stamp

FORMAT = "amnesia-sd-fisher"


def timestep_set(num_train_timesteps: int, num_timesteps: int | None) -> torch.Tensor:
    """All training timesteps, or `num_timesteps` of them evenly spaced."""
    if num_timesteps is None or num_timesteps >= num_train_timesteps:
        return torch.arange(num_train_timesteps)
    return torch.linspace(0, num_train_timesteps - 1, num_timesteps).round().long().unique()


def sample_noise(seed: int, index: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Fresh noise for every timestep of sample `index`, independent of how the work is split."""
    generator = torch.Generator("cpu").manual_seed(image_seed(seed, index, "fisher"))
    return torch.randn((count, *shape), generator=generator)


def fisher_diagonal(
    unet, scheduler, latents: torch.Tensor, embed, timesteps: torch.Tensor, seed: int,
    timestep_batch_size: int, indices: list[int] | None = None, autocast=None, progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over `indices` (default: all samples) of the squared per-sample gradients, divided by N.

    `embed(n)` gives sample n's text embedding, [1, tokens, width].
    The gradient of each sample is taken of its loss summed over `timesteps`, scaled by
    num_train_timesteps / len(timesteps) so a timestep subset estimates the full sum.
    With `indices` a subset, the result is this process's share: shares add up to F.
    """
    import contextlib

    device = next(unet.parameters()).device
    params = [p for p in unet.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    indices = list(range(len(latents))) if indices is None else indices
    scale = scheduler.config.num_train_timesteps / len(timesteps)
    unet.eval()  # no dropout: F is a property of the model, not of a random mask
    bar = tqdm(total=len(indices), desc="Fisher", unit="sample", disable=not progress)
    for n in indices:
        x0 = latents[n : n + 1].to(device)
        noise = sample_noise(seed, n, len(timesteps), tuple(latents.shape[1:]))
        embedding = embed(n)
        unet.zero_grad(set_to_none=True)
        for start in range(0, len(timesteps), timestep_batch_size):
            t = timesteps[start : start + timestep_batch_size].to(device)
            with autocast() if autocast else contextlib.nullcontext():
                losses = per_sample_loss(
                    unet, scheduler, x0.expand(len(t), -1, -1, -1),
                    noise[start : start + len(t)].to(device), t, embedding.expand(len(t), -1, -1),
                )
            (losses.sum() * scale).backward()
        grads = [p.grad.float() if p.grad is not None else torch.zeros_like(f) for p, f in zip(params, fisher)]
        torch._foreach_addcmul_(fisher, grads, grads)
        bar.update(1)
        first_batch(bar, len(timesteps), "Fisher")
    bar.close()
    unet.zero_grad(set_to_none=True)
    torch._foreach_div_(fisher, len(latents))
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    return dict(zip(names, fisher))


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], dtype: str, metadata: dict) -> None:
    """Written only when every value is a valid Fisher entry in the stored dtype."""
    tensors = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in fisher.items()}
    for name, value in tensors.items():
        problem = fisher_problem(value)
        if problem:
            raise UserError(f"the Fisher's {name} {problem} (stored as {dtype}); nothing was written: check the "
                            "model and the replay set (a model that produces NaN cannot be anchored)")
    meta = {"format": FORMAT, **stamp(), "dtype": dtype, **metadata}
    write_safetensors(path, tensors, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def load_fisher(path: str | Path, unet) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a Fisher file and check it covers exactly this UNet's parameters, shape for shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no Fisher file at {path}: compute it once per base model with "
            f"`amnesia-sd fim --model MODEL --output {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            fisher = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path} is not a safetensors Fisher file ({str(exc).splitlines()[0]}); compute one with "
            "`amnesia-sd fim` (pickled files are never loaded)"
        ) from None
    expected = dict(unet.named_parameters())
    missing = sorted(set(expected) - set(fisher))
    extra = sorted(set(fisher) - set(expected))
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(
            f"Fisher file {path} does not match the model: {len(missing)} parameter(s) missing, "
            f"{len(extra)} unexpected (e.g. {example}); it was computed for another UNet "
            f"({metadata.get('base_model', 'unknown model')}): run `amnesia-sd fim` for this one"
        )
    for name, value in fisher.items():
        if value.shape != expected[name].shape:
            raise UserError(
                f"Fisher file {path} does not match the model: {name} has shape {tuple(value.shape)}, "
                f"the model's is {tuple(expected[name].shape)}; run `amnesia-sd fim` for this model"
            )
        problem = fisher_problem(value)
        if problem:
            raise UserError(f"Fisher file {path} is broken: {name} {problem}; compute it again with `amnesia-sd fim`")
    return fisher, metadata


def fisher_problem(value: torch.Tensor) -> str | None:
    """Why a tensor cannot be a diagonal Fisher (squared gradients: finite floats >= 0), or None."""
    if not value.dtype.is_floating_point:
        return f"has dtype {str(value.dtype).replace('torch.', '')}, not a floating-point type"
    if not torch.isfinite(value).all():
        return f"holds {int((~torch.isfinite(value)).sum())} non-finite value(s) (NaN or inf)"
    if (value < 0).any():
        return f"holds {int((value < 0).sum())} negative value(s)"
    return None


def fisher_metadata(unet, scheduler, base_model: str, num_samples: int, timesteps, seed: int, replay: str) -> dict:
    return {
        "base_model": base_model,
        "unet_config_hash": unet_config_hash(unet),
        "num_samples": str(num_samples),
        "num_timesteps": str(len(timesteps)),
        "num_train_timesteps": str(scheduler.config.num_train_timesteps),
        "timestep_scale": str(scheduler.config.num_train_timesteps / len(timesteps)),
        "prediction_type": scheduler.config.prediction_type,
        "seed": str(seed),
        "replay_set": replay,
    }


def compute_fim(config) -> Path:
    """`amnesia-sd fim`: the Fisher of the base UNet over a replay set, written as safetensors."""
    from .cost import announce
    from .imageset import MANIFEST, generate_image_set, is_cached, is_finished, load_image_set, set_record
    from .models import load_on_device, make_accelerator, model_path
    from .paths import Output, check_output, check_overlap
    from .prompts import repeat_to, replay_prompts

    output = Path(config.output)
    replay_dir = None if config.replay_dir else output.with_name(output.name.removesuffix(".safetensors") + "-replay")
    outputs = [Output("--output", output, None, "Fisher")]
    if replay_dir:  # a cache of ours beside the Fisher, reused when its settings match
        outputs.append(Output("--output's replay set", replay_dir, MANIFEST, "image set"))
    check_overlap(outputs, {"--model": model_path(config.model), "--replay-dir": config.replay_dir,
                            "--prompts": config.prompts_file})
    check_output(outputs[0], config.overwrite)
    if replay_dir and not is_finished(replay_dir):
        check_output(outputs[1], False)
    if config.replay_dir:
        load_image_set(config.replay_dir)  # a bad set fails before the model loads
    accelerator = make_accelerator(config.mixed_precision)
    ref, pipe = load_on_device(config.model, accelerator)
    steps = len(timestep_set(pipe.scheduler.config.num_train_timesteps, config.num_timesteps))
    if config.replay_dir:
        replay = load_image_set(config.replay_dir, pipe.unet)
        announce("fim", [fisher_cost(config.num_images or len(replay.latents), steps)])
    else:
        prompts = repeat_to(replay_prompts(config.prompts_file), config.num_images)
        cached = is_cached(replay_dir, set_record(pipe, ref, prompts, config, "replay"))
        announce("fim", [replay_cost(len(prompts), config, cached), fisher_cost(len(prompts), steps)])
        replay = generate_image_set(pipe, ref, prompts, config, replay_dir, "replay", accelerator, reuse=True)
    if config.num_images and config.num_images > len(replay.latents):
        raise UserError(f"--num-images {config.num_images} is more than the {len(replay.latents)} images of {replay.path}")
    write_fisher_of_set(pipe, ref, replay, config.num_images or len(replay.latents), config.num_timesteps, config.seed,
                        config.timestep_batch_size, config.gradient_checkpointing, accelerator, output,
                        config.fim_dtype)
    return output


def fisher_cost(samples: int, timesteps: int) -> tuple[str, int]:
    return f"Fisher ({samples} samples x {timesteps} timesteps, forward+backward)", samples * timesteps


def replay_cost(images: int, settings, cached: bool) -> tuple[str, int | None]:
    from .cost import generation_passes

    passes = generation_passes(images, settings.num_inference_steps, settings.guidance_scale)
    return f"replay set ({images} images x {settings.num_inference_steps} steps)", None if cached else passes


def write_fisher_of_set(pipe, ref, replay, count: int, num_timesteps: int | None, seed: int, timestep_batch_size: int,
                        gradient_checkpointing: bool, accelerator, output: Path, dtype: str = "fp32") -> None:
    """The Fisher of the loaded base UNet over the first `count` images of a replay set, written
    to `output` by the first process (processes share the samples)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timesteps = timestep_set(scheduler.config.num_train_timesteps, num_timesteps)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.to("cpu")  # latents are cached: the VAE has nothing to do here
    if gradient_checkpointing:  # activations of a whole timestep batch: trade compute for memory
        pipe.unet.enable_gradient_checkpointing()
    indices = list(range(accelerator.process_index, count, accelerator.num_processes))
    fisher = fisher_diagonal(
        pipe.unet, scheduler, replay.latents[:count],
        lambda n: encode_prompts(pipe.tokenizer, pipe.text_encoder, [replay.prompts[n]]),
        timesteps, seed, timestep_batch_size, indices, autocast=accelerator.autocast,
        progress=accelerator.is_main_process,
    )
    if accelerator.num_processes > 1:
        fisher = {k: accelerator.reduce(v, reduction="sum") for k, v in fisher.items()}
    if accelerator.is_main_process:
        meta = fisher_metadata(pipe.unet, scheduler, ref.identity, count, timesteps, seed, str(replay.path))
        save_fisher(output, fisher, dtype, meta)
    accelerator.wait_for_everyone()
