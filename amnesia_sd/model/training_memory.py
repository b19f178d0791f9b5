"""What a forget run holds on the device: the preflight line (weights, gradients, optimizer state,
Fisher and anchor, EMA) and the training step's predicted peak, checked against the budget before
any work."""

from __future__ import annotations

import dataclasses

from amnesia_sd.core.config import ForgetConfig
from amnesia_sd.core.errors import UserError
from amnesia_sd.model.families import Conditioning
from amnesia_sd.model.memory import activation_peak, gib, meta_copy
from amnesia_sd.model.trainable import lora_modules, trainable_names


GPU_SIZES_GB = (24, 48, 80)


def memory_parts(n_all: int, n_train: int, penalty_bytes: int, use_8bit_adam: bool, ema: bool,
                 weight_bytes: int = 4, shards: int = 1) -> dict[str, int]:
    """Bytes the run keeps on the accelerator besides activations: the UNet's weights (fp32; a LoRA
    run's frozen base in the mixed-precision dtype) and, for the parameters that train, fp32
    gradients, AdamW's two moments (8-bit: a quarter) and the EMA copy when asked for; and the
    penalty's Fisher (and anchor theta*, in full training). Under FSDP over `shards` processes each
    holds a 1/shards slice of every one of them (rounded up)."""
    parts = {"weights": weight_bytes * n_all, "grads": 4 * n_train, "optimizer": (2 if use_8bit_adam else 8) * n_train,
             "fisher+anchor": penalty_bytes, "ema": 4 * n_train if ema else 0}
    return {k: -(-v // shards) for k, v in parts.items()}


def fsdp_units(unet) -> tuple[int, int]:
    """The parameter counts FSDP's transformer-based wrap (accelerate's TRANSFORMER_BASED_WRAP: each
    module of a class in the denoiser's _no_split_modules, then the root) all-gathers: the largest
    unit's own (those in no unit nested in it) and the root's (those in no unit)."""
    names = set(getattr(type(unet), "_no_split_modules", None) or ())
    own = {unet: 0}

    def walk(module, unit) -> None:
        own[unit] += sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            # The MRO, as the policy's isinstance: an FSDP-wrapped module's class is a subclass.
            if any(c.__name__ in names for c in type(child).__mro__):
                own[child] = 0
                walk(child, child)
            else:
                walk(child, unit)

    walk(unet, unet)
    root = own.pop(unet)
    return max(own.values(), default=0), root


def unsharded_bytes(unet, mixed_precision: str) -> int:
    """What FSDP (full shard) holds whole on each process beyond its slices, counted conservatively:
    the unit computing and the one prefetched, both as large as the largest, and the root's own
    parameters all through forward and backward, each in the compute dtype with a float32 gradient
    before its reduce-scatter."""
    largest, root = fsdp_units(unet)
    return (2 * largest + root) * ((2 if mixed_precision in ("bf16", "fp16") else 4) + 4)


def fits(total_bytes: int) -> str:
    """The smallest common GPU that holds this much with a tenth to spare, and what is left there for
    activations (not counted here: they depend on resolution, batch and checkpointing)."""
    for size in GPU_SIZES_GB:
        if total_bytes <= 0.9 * size * 1e9:
            return f"a {size} GB GPU keeps about {size - total_bytes / 1e9:.0f} GB for activations"
    return f"more than a {GPU_SIZES_GB[-1]} GB GPU holds"


def training_peak(family, unet, config: ForgetConfig, latent: tuple[int, int], mixed_precision: str,
                  adversary_bytes: int = 0, shards: int = 1) -> int:
    """Predicted peak bytes of training on the device (per process under FSDP over `shards`), from
    the UNet before it trains: what memory_parts counts (and, under FSDP, the unsharded units), and
    the activations of one forward over the process's surrogate + replay images; with
    --adversarial, the inner attack too (between steps: no gradients of the UNet, but the adversary's
    float32 text encoders and a forward and backward through the UNet at --adversarial-batch-size)."""
    sizes = {name: p.numel() for name, p in unet.named_parameters()}
    store = 2 if config.fim_dtype != "fp32" else 4
    if config.lora_rank:
        modules = dict(unet.named_modules())
        adapted = lora_modules(unet, config.train_method, config.lora_target_list())
        n_train = sum(config.lora_rank * (modules[m].weight[0].numel() + modules[m].weight.shape[0]) for m in adapted)
        n_all, penalty = sum(sizes.values()), store * sum(sizes[f"{m}.weight"] for m in adapted)
    else:
        n_train = sum(sizes[name] for name in trainable_names(unet, config.train_method))
        n_all, penalty = sum(sizes.values()), 2 * store * n_train
    half_base = bool(config.lora_rank) and mixed_precision != "no"  # a LoRA run's frozen base in 16 bits
    parts = memory_parts(n_all, n_train, penalty, config.use_8bit_adam, bool(config.ema_decay), 2 if half_base else 4,
                         shards)
    if shards > 1:
        parts["unsharded units"] = unsharded_bytes(unet, mixed_precision)
    # Under FSDP the gathered weights are already in the compute dtype: autocast makes no copies.
    float32_weights = not half_base and shards == 1
    meta = meta_copy(unet)
    activations = activation_peak(family, meta, 2 * config.train_batch_size, latent, mixed_precision,
                                  config.gradient_checkpointing, float32_weights=float32_weights)
    step = sum(parts.values()) + activations
    if not config.adversarial:
        return step
    inner = sum(parts.values()) - parts["grads"] + adversary_bytes + activation_peak(
        family, meta, config.adversarial_batch_size, latent, mixed_precision, config.gradient_checkpointing,
        float32_weights=float32_weights)
    return max(step, inner)


def check_training_memory(family, unet, config: ForgetConfig, latent: tuple[int, int], mixed_precision: str,
                          limit: int | None, adversary_bytes: int = 0, shards: int = 1) -> int:
    """The training step's predicted peak (per process under FSDP over `shards`); over the budget,
    refused before any work with the settings that would fit, each with its predicted peak (none is
    switched on silently: each changes results or speed)."""
    peak = training_peak(family, unet, config, latent, mixed_precision, adversary_bytes, shards)
    if limit is None or peak <= limit:
        return peak
    options = [("--gradient-checkpointing", {"gradient_checkpointing": True}),
               ("--fim-dtype bf16", {"fim_dtype": "bf16"}), ("--use-8bit-adam", {"use_8bit_adam": True})]
    if not config.lora_rank:
        options.append(("--lora-rank 8", {"lora_rank": 8}))
    options += [(f"--train-batch-size {b}", {"train_batch_size": b})
                for b in sorted({config.train_batch_size // 2, 1}, reverse=True) if 0 < b < config.train_batch_size]
    said = []
    for flag, change in options:
        other = training_peak(family, unet, dataclasses.replace(config, **change), latent, mixed_precision,
                              adversary_bytes, shards)
        said.append(f"{flag} ({gib(other)}{', fits' if other <= limit else ''})")
    where = f"per process (FSDP over {shards} processes)" if shards > 1 else "on the device"
    raise UserError(f"training needs about {gib(peak)} {where} at its peak, the budget is "
                    f"{gib(limit)} (--max-memory or the GPU's free memory): options, alone, with their "
                    f"predicted peaks: {'; '.join(said)}; several together fit where one alone does not")


def preflight(unet, trainable, config: ForgetConfig, text_cache: Conditioning, ema: bool, adversary_bytes: int = 0,
              shards: int = 1) -> str:
    """What the run will hold on the accelerator (each process, under FSDP over `shards`), before
    the long work starts."""
    gib = 2**30
    n_train = sum(p.numel() for p in trainable.params)
    n_all = sum(p.numel() for p in unet.parameters()) - (n_train if config.lora_rank else 0)
    frozen = next((p for p in unet.parameters() if not p.requires_grad), None) if config.lora_rank else None
    weight_bytes = frozen.element_size() if frozen is not None else 4
    parts = memory_parts(n_all, n_train, trainable.penalty_bytes, config.use_8bit_adam, ema, weight_bytes, shards)
    if shards > 1:
        parts["unsharded units"] = unsharded_bytes(unet, config.mixed_precision)
    parts["text cache"] = sum(v.numel() * v.element_size() for v in text_cache.values())
    parts["adversary's text encoder"] = adversary_bytes
    total = sum(parts.values())
    detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
    hint = "" if total <= 0.9 * GPU_SIZES_GB[0] * 1e9 else (
        " (less: --fim-dtype bf16, --use-8bit-adam, --train-method noxattn or xattn)")
    what = f"LoRA rank {config.lora_rank} adapters: {n_train / 1e6:.2f}M parameters on {n_all / 1e6:.1f}M frozen" \
        if config.lora_rank else f"{n_train / 1e6:.1f}M of {n_all / 1e6:.1f}M {type(unet).__name__} parameters train"
    where = f" per process (FSDP over {shards} processes)" if shards > 1 else ""
    return (f"preflight: {what}; about "
            f"{total / gib:.2f} GiB{where} before activations ({detail} GiB); {fits(total)}{hint}; "
            f"{config.max_train_steps} steps x {config.train_batch_size}+{config.train_batch_size} images "
            f"x {config.gradient_accumulation_steps} accumulation" + (
                f"; an inner attack of {config.adversarial_steps} steps x {config.adversarial_batch_size} images "
                f"before step 1 and every {config.adversarial_every} steps" if config.adversarial else "")
            + "; the progress bar's ETA follows the first steps")
