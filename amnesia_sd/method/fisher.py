"""The diagonal Fisher information of the base denoiser (METHOD.md):

    F_i = (1/N) sum_n ( d/dtheta_i sum_{t in T} w_t L_t(x_n, c_n) )^2

w_t is N_train x the probability that training draws timestep t (families.py): 1 for the uniform
draws of DDPM and Flux, the logit-normal density's mass for SD3, so the sum over t is the
expectation training samples from (a grid of it, scaled, for a subset).

x_n are latents the base model generated from the replay prompts c_n. The sum over t is evaluated
in batched chunks of timesteps of one sample: the gradient of the sum is the sum of the chunks'
gradients, so chunking changes speed, never the result. Each sample's noise comes from a generator
seeded by the run's seed and the sample's index, so neither batching nor sharding changes F.

Under DDP each process takes its own samples and the sums are added at the end. Under FSDP a
process holds only its rows of each gradient, after a reduce-scatter that would mix samples before
they are squared; so every process works on the same sample, each on its share of the timestep
chunks, and the reduce-scatter adds the shares into the sample's whole gradient, of which each
process squares its rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from amnesia_sd.core.cache import FISHER_FORMAT
from amnesia_sd.core.cost import first_batch, generation_passes, say
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_safetensors
from amnesia_sd.core.paths import stamp
from amnesia_sd.data.generate import image_seed
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import FAMILIES, expand, family_of, take, to_device
from amnesia_sd.model.loading import DTYPES, sharded, unet_config_hash
from amnesia_sd.model.memory import budget, fisher_chunk, gib, out_of_memory, plan_line, weight_bytes
from amnesia_sd.model.shards import local, whole
from amnesia_sd.model.training_memory import unsharded_bytes

FORMAT = FISHER_FORMAT
DEFAULT_TIMESTEP_BATCH = 100  # timesteps per pass when memory allows (no budget: always)


def timestep_set(num_train_timesteps: int, num_timesteps: int | None) -> torch.Tensor:
    """All training timesteps, or `num_timesteps` of them evenly spaced."""
    if num_timesteps is None or num_timesteps >= num_train_timesteps:
        return torch.arange(num_train_timesteps)
    return torch.linspace(0, num_train_timesteps - 1, num_timesteps).round().long().unique()


def sample_noise(seed: int, index: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Fresh noise for every timestep of sample `index`, independent of how the work is split."""
    generator = torch.Generator("cpu").manual_seed(image_seed(seed, index, "fisher"))
    return torch.randn((count, *shape), generator=generator)


# fp16 backward: the loss is multiplied by this before .backward() and the gradient divided by it in
# float32 before squaring, so per-element gradients of the MSE (about 1e-5 at 512 px) stay above
# fp16's smallest normal number instead of flushing to zero. A sample whose scaled gradient
# overflows is done again at half the scale; the scale doubles back after GROWTH_INTERVAL clean samples.
FP16_LOSS_SCALE = 2.0**16
GROWTH_INTERVAL = 100


def fisher_diagonal(
    family, unet, scheduler, latents: torch.Tensor, embed, timesteps: torch.Tensor, seed: int,
    timestep_batch_size: int, indices: list[int] | None = None, autocast=None, progress: bool = True,
    loss_scale: float | None = None, shared: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Sum over `indices` (default: all samples) of the squared per-sample gradients, divided by N.

    `embed(n)` gives sample n's conditioning (families.py), one row.
    The gradient of each sample is taken of its loss summed over `timesteps` (weighted by the
    family's timestep_weights), scaled by num_train_timesteps / len(timesteps) so a timestep subset
    estimates the full sum.
    With `indices` a subset, the result is this process's share: shares add up to F.
    `loss_scale` (fp16: FP16_LOSS_SCALE) is the starting dynamic loss scale; None: no scaling.
    `shared` (process, processes): FSDP, each sample's timestep chunks shared out (module docstring);
    the result is this process's rows of F.
    """
    import contextlib

    device = next(unet.parameters()).device
    params = [p for p in unet.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(local(p), dtype=torch.float32) for p in params]
    indices = list(range(len(latents))) if indices is None else indices
    scale = scheduler.config.num_train_timesteps / len(timesteps)
    chunks = list(range(0, len(timesteps), timestep_batch_size))
    if shared is not None:
        # Chunk k to process k mod N; every process makes as many passes (each is a collective): one
        # past the end redoes chunk 0 at weight 0. The reduce-scatter averages: times N, it adds.
        rank, world = shared
        chunks = [chunks[k] if k < len(chunks) else None for k in range(rank, world * math.ceil(len(chunks) / world),
                                                                         world)]
        scale *= world
    weights = family.timestep_weights(scheduler)[timesteps].to(device)
    weights = None if bool((weights == 1).all()) else weights  # uniform: a plain sum
    loss_scale_now, clean = loss_scale or 1.0, 0
    unet.eval()  # no dropout: F is a property of the model, not of a random mask
    bar = tqdm(total=len(indices), desc="Fisher", unit="sample", disable=not progress)
    for n in indices:
        x0 = latents[n : n + 1].to(device)
        noise = sample_noise(seed, n, len(timesteps), tuple(latents.shape[1:]))
        cond = embed(n)
        while True:
            unet.zero_grad(set_to_none=True)
            for start in chunks:
                used = 0.0 if start is None else 1.0
                start = start or 0
                t = timesteps[start : start + timestep_batch_size].to(device)
                with autocast() if autocast else contextlib.nullcontext():
                    losses = per_sample_loss(
                        family, unet, scheduler, x0.expand(len(t), -1, -1, -1),
                        noise[start : start + len(t)].to(device), t, expand(cond, len(t)),
                    )
                total = losses.sum() if weights is None else losses @ weights[start : start + len(t)]
                (total * (scale * loss_scale_now * used)).backward()
            grads = [local(p.grad).float() if p.grad is not None else torch.zeros_like(f) for p, f in zip(params, fisher)]
            if loss_scale is None:
                break
            if torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                torch._foreach_div_(grads, loss_scale_now)  # in float32, before squaring
                clean += 1
                if clean % GROWTH_INTERVAL == 0:
                    loss_scale_now *= 2
                break
            if loss_scale_now <= 1.0:  # not the scale's fault: the model itself overflows
                break
            loss_scale_now, clean = loss_scale_now / 2, 0
        torch._foreach_addcmul_(fisher, grads, grads)
        bar.update(1)
        first_batch(bar, len(timesteps), "Fisher")
    bar.close()
    unet.zero_grad(set_to_none=True)
    torch._foreach_div_(fisher, len(latents))
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    return dict(zip(names, fisher))


def read_fisher(path: str | Path, rows: dict[str, slice | None]) -> dict[str, torch.Tensor]:
    """Entries of a Fisher file that load_fisher checked whole when the run began: each whole
    (None) or only the rows given (a process's FSDP shard); nothing else is read."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) if r is None else f.get_slice(name)[r.start : r.stop]
                for name, r in rows.items()}


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


def load_fisher(path: str | Path, pipe, names=None, require=()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check a Fisher file was made for this pipeline's architecture, covers exactly its denoiser's
    parameters (a LoRA run's Fisher: the adapted layers' weights, and at least `require` and
    `names`), shape for shape, and holds valid values (finite, >= 0, floating point); return the
    entries of `names` (default: all). Entries are read one at a time: the others are never held."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no Fisher file at {path}: compute it once per base model with "
            f"`amnesia-sd fim --model MODEL --output {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            family = family_of(pipe)
            made_for = metadata.get("architecture")
            if made_for and made_for != family.name:
                title = FAMILIES[made_for].title if made_for in FAMILIES else made_for
                raise UserError(f"Fisher file {path} was made for a {title} model "
                                f"({metadata.get('base_model', 'unknown')}), this model is {family.title}: "
                                "run `amnesia-sd fim` for this one")
            expected = {name: tuple(p.shape) for name, p in family.denoiser_of(pipe).named_parameters()}
            extra = sorted(set(shapes) - set(expected))
            missing = sorted(set(expected) - set(shapes))
            if metadata.get("covers") == "lora" and not extra:  # the adapted layers' entries only
                needed = set(require) | set(names or ())
                absent = sorted(needed - set(shapes))
                if absent:
                    raise UserError(
                        f"Fisher file {path} holds only the entries of a LoRA run's adapted layers (--lora-targets "
                        f"{metadata.get('lora_targets')}), not {absent[0]} ({len(absent)} missing), which this run "
                        "trains: compute it with `amnesia-sd fim` with this run's --lora-targets, or without "
                        "--lora-targets for every parameter")
                missing = []
            if missing or extra:
                example = (missing or extra)[0]
                raise UserError(
                    f"Fisher file {path} does not match the model: {len(missing)} parameter(s) missing, "
                    f"{len(extra)} unexpected (e.g. {example}); it was computed for another UNet "
                    f"({metadata.get('base_model', 'unknown model')}): run `amnesia-sd fim` for this one"
                )
            for name, shape in shapes.items():
                if shape != expected[name]:
                    raise UserError(
                        f"Fisher file {path} does not match the model: {name} has shape {shape}, "
                        f"the model's is {expected[name]}; run `amnesia-sd fim` for this model"
                    )
            keep, fisher = set(shapes if names is None else names), {}
            for name in shapes:  # every entry is checked, one at a time; only those asked for are kept
                value = f.get_tensor(name)
                problem = fisher_problem(value)
                if problem:
                    raise UserError(f"Fisher file {path} is broken: {name} {problem}; compute it again with "
                                    "`amnesia-sd fim`")
                if name in keep:
                    fisher[name] = value
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path} is not a safetensors Fisher file ({str(exc).splitlines()[0]}); compute one with "
            "`amnesia-sd fim` (pickled files are never loaded)"
        ) from None
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


def weights_dtype(pipe) -> str:
    """The dtype the denoiser's weights had while their Fisher was computed ('float32', 'bfloat16')."""
    return str(family_of(pipe).denoiser_of(pipe).dtype).removeprefix("torch.")


def lora_metadata(pipe, lora: tuple[str, list[str]]) -> dict[str, str]:
    """What the Fisher of a LoRA run's adapted layers records beside fisher_metadata: what it
    covers (--lora-targets, the number of layers), on a base of which dtype."""
    return {"covers": "lora", "lora_targets": lora[0], "lora_layers": str(len(lora[1])),
            "weights_dtype": weights_dtype(pipe)}


def fisher_metadata(pipe, scheduler, base_model: str, num_samples: int, timesteps, seed: int, replay: str,
                    mixed_precision: str) -> dict:
    family = family_of(pipe)
    return {
        # The precision of its forward and backward passes ('no': float32; 'fp16' with loss scaling).
        "mixed_precision": mixed_precision,
        "weights_dtype": weights_dtype(pipe),
        "base_model": base_model,
        "architecture": family.name,
        "unet_config_hash": unet_config_hash(family.denoiser_of(pipe)),
        "num_samples": str(num_samples),
        "num_timesteps": str(len(timesteps)),
        "num_train_timesteps": str(scheduler.config.num_train_timesteps),
        "timestep_scale": str(scheduler.config.num_train_timesteps / len(timesteps)),
        "prediction_type": family.prediction_type(pipe),
        "seed": str(seed),
        "replay_set": replay,
    }


def fisher_cost(samples: int, timesteps: int) -> tuple[str, int]:
    return f"Fisher ({samples} samples x {timesteps} timesteps, forward+backward)", samples * timesteps


def replay_cost(images: int, settings, cached: bool) -> tuple[str, int | None]:
    passes = generation_passes(images, settings.num_inference_steps, settings.guidance_scale)
    return f"replay set ({images} images x {settings.num_inference_steps} steps)", None if cached else passes


def fisher_plan(pipe, latent: tuple[int, int], num_timesteps: int, timestep_batch_size: int | None,
                gradient_checkpointing: bool, mixed_precision: str, max_memory: str | None,
                device, covered: set[str] | None = None, shards: int = 1) -> tuple[int, str, int]:
    """The Fisher's timestep batch (the largest that fits the budget unless given) and its plan in
    words and its predicted peak: what it holds besides activations is the denoiser, the text
    encoders, and the gradient and the float32 sum of squares of what it covers (`covered`: a LoRA
    run's adapted weights; None: every parameter); under FSDP over `shards` processes, a slice of
    the denoiser and of those, and the units gathered whole."""
    family = family_of(pipe)
    unet = family.denoiser_of(pipe)
    n = sum(p.numel() for name, p in unet.named_parameters() if covered is None or name in covered)
    # the gradient in the weights' dtype, its float32 copy when that is 16-bit, the float32 sum
    grad = unet.dtype.itemsize + (4 if unet.dtype != torch.float32 else 0)
    resident = (weight_bytes(unet) + (grad + 4) * n) // shards + weight_bytes(*family.loaded_text_encoders(pipe))
    if shards > 1:
        resident += unsharded_bytes(unet, mixed_precision)
    limit = budget(max_memory, device)
    chunk, peak = fisher_chunk(family, unet, latent, num_timesteps, mixed_precision, gradient_checkpointing,
                               resident, limit, timestep_batch_size, DEFAULT_TIMESTEP_BATCH)
    detail = (f"{chunk} timestep(s) per pass ({type(unet).__name__}, text encoders, gradient and sum of "
              f"{'every parameter' if covered is None else 'the adapted layers'} {gib(resident)})")
    return chunk, plan_line("the Fisher", detail, peak, limit), peak


def write_fisher_of_set(pipe, ref, replay, count: int, num_timesteps: int | None, seed: int,
                        timestep_batch_size: int | None, gradient_checkpointing: bool, accelerator, output: Path,
                        dtype: str = "fp32", max_memory: str | None = None, lora: tuple[str, list[str]] | None = None,
                        ) -> None:
    """The Fisher of the loaded base denoiser over the first `count` images of a replay set, written
    to `output` by the first process (processes share the samples). With `lora` (--lora-targets as
    given, the weights of the layers they adapt), only those weights, what a LoRA run's penalty
    reads: the gradient and the sum of squares of those alone."""
    family = family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    covered = set(lora[1]) if lora else None
    if covered is not None:
        for name, p in denoiser.named_parameters():
            p.requires_grad_(name in covered)
    scheduler = family.training_scheduler(pipe.scheduler.config)
    timesteps = timestep_set(scheduler.config.num_train_timesteps, num_timesteps)
    for encoder in family.loaded_text_encoders(pipe):
        encoder.requires_grad_(False)
    pipe.vae.to("cpu")  # latents are cached: the VAE has nothing to do here
    shared = (accelerator.process_index, accelerator.num_processes) if sharded(accelerator) else None
    timestep_batch_size, said, predicted = fisher_plan(
        pipe, tuple(replay.latents.shape[2:]), len(timesteps), timestep_batch_size, gradient_checkpointing,
        accelerator.mixed_precision, max_memory, accelerator.device, covered, shared[1] if shared else 1)
    say(said)
    if gradient_checkpointing:  # activations of a whole timestep batch: trade compute for memory
        denoiser.enable_gradient_checkpointing()
    indices = None if shared else list(range(accelerator.process_index, count, accelerator.num_processes))
    if shared:
        denoiser = accelerator.prepare(denoiser)  # in place: every process keeps its rows of each weight
    images = to_device({k: replay.conditioning[k] for k in family.image_keys}, accelerator.device)

    def embed(n: int):
        return {**family.encode_text(pipe, [replay.prompts[n]]), **take(images, slice(n, n + 1))}

    advice = (f"pass a smaller --timestep-batch-size (this run took {timestep_batch_size})"
              + ("" if gradient_checkpointing else " or --gradient-checkpointing"))
    with out_of_memory("the Fisher", predicted, advice):
        fisher = fisher_diagonal(
            family, denoiser, scheduler, replay.latents[:count], embed,
            timesteps, seed, timestep_batch_size, indices, autocast=accelerator.autocast,
            progress=accelerator.is_main_process,
            loss_scale=FP16_LOSS_SCALE if accelerator.mixed_precision == "fp16" else None, shared=shared,
        )
    if shared:  # gathered one entry at a time, kept by the first process in the stored dtype
        params, gathered = dict(denoiser.named_parameters()), {}
        for name, rows in fisher.items():
            entry = whole(rows, params[name])
            if accelerator.is_main_process:
                gathered[name] = entry.to("cpu", DTYPES[dtype])
        fisher = gathered
    elif accelerator.num_processes > 1:
        fisher = {k: accelerator.reduce(v, reduction="sum") for k, v in fisher.items()}
    if accelerator.is_main_process:
        meta = fisher_metadata(pipe, scheduler, ref.identity, count, timesteps, seed, str(replay.path),
                               accelerator.mixed_precision)
        if covered is not None:
            meta.update(lora_metadata(pipe, lora))
        save_fisher(output, fisher, dtype, meta)
    denoiser.requires_grad_(True)
    accelerator.wait_for_everyone()
