"""The memory plan: what each phase that runs the denoiser (sampling, the Fisher's chunks,
forgetting's steps, a learned token) holds on the device at its peak, predicted before any work;
the sizes chosen to fit a budget; and a device out-of-memory turned into one line.

Activations are counted on the meta device (no weights, no compute: well under a second for SD's
UNet): a copy of the denoiser runs the phase's batch at its size while a saved-tensors hook adds up
the distinct storages autograd keeps for backward (the weights excluded: they are counted apart).
Fused attention (PyTorch's SDPA on a GPU or a CPU, xformers) keeps q, k, v, its output and the
log-sum-exp, never the score matrix; the meta run is told to keep the same. The forward's peak is
those bytes plus the op in flight and its temporaries: TRANSIENT of them, measured (docs/costs.md,
"Memory plan"; benchmarks/memory_plan.py checks the prediction against a real run). Sampling keeps
nothing for backward: there the tensors alive at once are counted, op by op.
"""

from __future__ import annotations

import contextlib
import json
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from amnesia_sd.core.config import parse_size
from amnesia_sd.core.errors import UserError

# Measured on SD v1.4's UNet at 64x64 latents on the CPU (fp32, batch 1 and 2): the forward's peak
# above the weights is 1.19-1.20 x the bytes saved for backward; the backward stays below it.
TRANSIENT = 0.2
GIB = 2**30


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention():
    real = F.scaled_dot_product_attention

    def stand_in(*args, **kwargs):  # called positionally (UNet, SD3) or by name (Flux)
        q, k, v = [*args, *(kwargs[name] for name in ("query", "key", "value")[len(args):3])][:3]
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = stand_in
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def meta_copy(unet):
    """The same architecture on the meta device: shapes without memory."""
    with torch.device("meta"):
        return type(unet).from_config(unet.config)


_SAVED: dict[tuple, int] = {}  # the same architecture and shapes save the same bytes: counted once


def saved_bytes(family, meta_unet, batch: int, latent: tuple[int, int], dtype: torch.dtype,
                gradient_checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over one forward of `batch` latents of size `latent`; with
    gradient checkpointing, those it keeps plus the largest block's, recomputed in the backward."""
    key = (family.name, type(meta_unet).__name__, json.dumps(dict(meta_unet.config), sort_keys=True, default=str),
           batch, tuple(latent), dtype, gradient_checkpointing)
    if key not in _SAVED:
        _SAVED[key] = _count_saved(family, meta_unet, batch, latent, dtype, gradient_checkpointing)
    return _SAVED[key]


def _count_saved(family, meta_unet, batch: int, latent: tuple[int, int], dtype: torch.dtype,
                 gradient_checkpointing: bool) -> int:
    meta_unet.to(dtype).train()
    weights = {p.untyped_storage()._cdata for p in meta_unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
        return t

    def forward() -> int:
        seen.clear()
        noisy = torch.zeros((batch, family.latent_channels(meta_unet.config), *latent), device="meta", dtype=dtype)
        cond = family.example_conditioning(meta_unet.config, batch, latent, dtype)
        t = torch.zeros((batch,), device="meta", dtype=torch.long)
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            family.predict(meta_unet, noisy, t, cond)
        return sum(seen.values())

    if not gradient_checkpointing:
        return forward()
    blocks = family.blocks(meta_unet)
    before, own = {}, {}  # each block's own saves, from a run without checkpointing
    handles = [h for block in blocks for h in (
        block.register_forward_pre_hook(lambda m, *_: before.__setitem__(m, sum(seen.values()))),
        block.register_forward_hook(lambda m, *_: own.__setitem__(m, sum(seen.values()) - before[m])))]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    meta_unet.enable_gradient_checkpointing()
    try:
        return forward() + max(own.values())
    finally:
        meta_unet.disable_gradient_checkpointing()


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of tensors alive at once while code runs on the meta device: each op's new
    storages are counted until the last tensor object on them is gone (no autograd holds them under
    no_grad). Storages that existed before (weights, inputs) are not counted."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.refs, self.live, self.peak = existing, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key in self.existing:
                    continue
                if key not in self.refs:
                    self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[key][1]
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


def live_peak(module, run) -> int:
    """Peak bytes of what `run()` allocates (beyond `module`'s weights) under no_grad, on the meta device."""
    existing = {p.untyped_storage()._cdata for p in module.parameters()}
    existing |= {b.untyped_storage()._cdata for b in module.buffers()}
    with torch.no_grad(), _fused_attention(), _LiveBytes(existing) as counter:
        run()
    return counter.peak


def sampling_peak(family, meta_unet, meta_vae, batch: int, latent: tuple[int, int], dtype: torch.dtype,
                  guidance: bool, vae_dtype: torch.dtype) -> int:
    """Bytes above the weights while a batch of images is sampled: one denoising step of the UNet
    (twice the batch with classifier-free guidance), or the VAE decoding the batch, whichever is more."""
    rows = 2 * batch if guidance and family.unconditional_guidance else batch
    meta_unet.to(dtype).eval()
    meta_vae.to(vae_dtype).eval()

    def denoise():
        noisy = torch.zeros((rows, family.latent_channels(meta_unet.config), *latent), device="meta", dtype=dtype)
        t = torch.zeros((rows,), device="meta", dtype=torch.long)
        family.predict(meta_unet, noisy, t, family.example_conditioning(meta_unet.config, rows, latent, dtype))

    def decode():
        z = torch.zeros((batch, meta_vae.config.latent_channels, *latent), device="meta", dtype=vae_dtype)
        meta_vae.decode(z)

    return max(live_peak(meta_unet, denoise), live_peak(meta_vae, decode))


def activation_peak(family, meta_unet, batch: int, latent: tuple[int, int], mixed_precision: str,
                    gradient_checkpointing: bool, float32_weights: bool = True) -> int:
    """Predicted peak bytes of a forward and backward above what is resident (weights, gradients,
    optimizer, Fisher): the saved activations and the op in flight; under autocast with float32
    weights, also the 16-bit copy of every layer's weight that autocast makes and keeps for backward
    (measured on SD v1.4 with bf16 on the CPU: 1.6 of the 2.4 GiB saved at batch 1)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    saved = saved_bytes(family, meta_unet, batch, latent, dtype, gradient_checkpointing)
    casts = 0
    if dtype != torch.float32 and float32_weights:
        casts = 2 * sum(m.weight.numel() for m in meta_unet.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return int(saved * (1 + TRANSIENT)) + casts


def budget(max_memory: str | None, device) -> int | None:
    """Bytes the run may use on its device: --max-memory, else a CUDA device's free memory now (what
    is already there is not ours), else None (the CPU: no plan is enforced)."""
    if max_memory:
        return parse_size(max_memory)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        # What this process's allocator holds (weights already loaded, its cache) is ours to use too.
        return int(free + torch.cuda.memory_reserved(torch.device(device)))
    return None


def weight_bytes(*modules) -> int:
    """What the modules' parameters take, in their own dtypes."""
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def plan_line(what: str, detail: str, peak: int, limit: int | None) -> str:
    """'memory plan of WHAT: DETAIL, predicted peak X of a Y budget' (or: no budget on the CPU)."""
    return (f"memory plan of {what}: {detail + ', ' if detail else ''}predicted peak {gib(peak)}"
            + (f" of a {gib(limit)} budget" if limit else " (no budget on the CPU: --max-memory sets one)"))


def gib(n: int) -> str:
    """A size as people read it: GiB from one GiB up, MiB below."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def fisher_chunk(family, unet, latent: tuple[int, int], num_timesteps: int, mixed_precision: str,
                 gradient_checkpointing: bool, resident: int, limit: int | None, requested: int | None,
                 default: int) -> tuple[int, int]:
    """The Fisher's timestep batch and its predicted peak. The batch never changes the Fisher (the
    gradient of a sum is the sum of the chunks'), so without a given one the largest that fits the
    budget is chosen (at most `default`). A given one is kept, but refused when it does not fit, as is
    a budget too small for one timestep at a time."""
    meta = meta_copy(unet)
    largest = min(requested or default, num_timesteps)

    def peak(chunk: int, checkpointing: bool = gradient_checkpointing) -> int:
        return resident + activation_peak(family, meta, chunk, latent, mixed_precision, checkpointing)

    if limit is None:
        return largest, peak(largest)
    if requested:
        if peak(requested) > limit:
            fitting = largest_fitting(peak, largest, limit)
            raise UserError(
                f"--timestep-batch-size {requested} needs about {gib(peak(requested))} on the device, the budget is "
                f"{gib(limit)}: " + (f"use --timestep-batch-size {fitting} ({gib(peak(fitting))}) or leave it out"
                                     if fitting else "even 1 does not fit: " + _fisher_options(peak, limit,
                                                                                               gradient_checkpointing)))
        return requested, peak(requested)
    fitting = largest_fitting(peak, largest, limit)
    if not fitting:
        raise UserError(f"the Fisher needs about {gib(peak(1))} on the device with one timestep at a time, the budget "
                        f"is {gib(limit)}: " + _fisher_options(peak, limit, gradient_checkpointing))
    return fitting, peak(fitting)


def largest_fitting(peak, largest: int, limit: int) -> int:
    """The largest chunk in 1..largest whose peak fits (peaks grow with the chunk), or 0."""
    low, high = 0, largest
    while low < high:
        middle = (low + high + 1) // 2
        if peak(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def _fisher_options(peak, limit: int, gradient_checkpointing: bool) -> str:
    if not gradient_checkpointing and peak(1, True) <= limit:
        return f"add --gradient-checkpointing ({gib(peak(1, True))}), or raise --max-memory"
    return "raise --max-memory, or use a device with more memory"


def check_batch(what: str, flag: str, batch: int, peak, limit: int | None, more: str = "") -> int:
    """A training phase at `batch` (given by `flag`, results depend on it, so never changed here):
    its predicted peak, or a one-line refusal naming the largest batch that fits."""
    predicted = peak(batch)
    if limit is None or predicted <= limit:
        return predicted
    fitting = largest_fitting(peak, batch, limit)
    raise UserError(f"{what} needs about {gib(predicted)} on the device at {flag} {batch}, the budget is {gib(limit)}: "
                    + (f"{flag} {fitting} fits ({gib(peak(fitting))})" if fitting else "even 1 does not fit")
                    + (f"; {more}" if more else "") + "; or raise --max-memory")


@contextlib.contextmanager
def out_of_memory(phase: str, predicted: int | None, advice: str):
    """A device out-of-memory error in `phase` becomes one line: what the plan predicted, what the
    run had allocated at most, and what to change. What was made before (image sets, the Fisher,
    checkpoints) is finished and stays, so a rerun picks it up."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise out_of_memory_error(phase, predicted, advice) from None


def out_of_memory_error(phase: str, predicted: int | None, advice: str) -> UserError:
    measured = ""
    if torch.cuda.is_available():
        measured = f"; it had allocated up to {gib(torch.cuda.max_memory_allocated())} (max_memory_allocated)"
        torch.cuda.empty_cache()
    planned = f"the plan predicted a peak of {gib(predicted)}" if predicted else "no plan covered it"
    return UserError(f"out of memory on the device in {phase}: {planned}{measured}; {advice} (another process on the "
                     "GPU shrinks what is free: --max-memory tells the plan). Finished image sets, the Fisher and "
                     "checkpoints are kept; a rerun with the same flags picks them up")
