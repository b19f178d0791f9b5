"""Fisher benchmark: the reference implementation's estimator against amnesia-sd's, same model,
same samples, same noise; then what a timestep subset costs in accuracy.

The reference (the paper's public code) runs one batch-1 forward and backward per timestep of
every sample. amnesia-sd runs the timesteps of a sample in large batches. Both compute
F = mean_n (grad sum_t L_t)^2. Prints one JSON object; figures are ratios taken in this run.

    python benchmarks/fisher.py [--model digits] [--samples 2] [--subset-samples 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def reference_fisher(family, unet, scheduler, cond, latents, timesteps, seed):
    """Batch-1 forward and backward for every timestep of every sample, as the reference code does."""
    from amnesia_sd.model.diffusion import per_sample_loss
    from amnesia_sd.model.families import take
    from amnesia_sd.method.fisher import sample_noise

    params = [p for p in unet.parameters()]
    fisher = [torch.zeros_like(p) for p in params]
    scale = scheduler.config.num_train_timesteps / len(timesteps)
    for n in range(len(latents)):
        noise = sample_noise(seed, n, len(timesteps), tuple(latents.shape[1:]))
        one = take(cond, slice(n, n + 1))
        unet.zero_grad(set_to_none=True)
        for j, t in enumerate(timesteps):
            loss = per_sample_loss(family, unet, scheduler, latents[n : n + 1], noise[j : j + 1], t.reshape(1), one)
            (loss.sum() * scale).backward()
        for f, p in zip(fisher, params):
            f += p.grad**2
    return {name: f / len(latents) for (name, _), f in zip(unet.named_parameters(), fisher)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.empty_like(a).index_put_((a.argsort(),), torch.arange(len(a), dtype=a.dtype))
    rb = torch.empty_like(b).index_put_((b.argsort(),), torch.arange(len(b), dtype=b.dtype))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def flat(fisher: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in fisher.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samples", type=int, default=1, help="samples for the speed comparison")
    parser.add_argument("--timesteps", type=int, default=1000,
                        help="evenly spaced timesteps for the speed comparison (the reference's cost grows with it)")
    parser.add_argument("--subset-samples", type=int, default=16, help="samples for the subset accuracy part")
    parser.add_argument("--timestep-batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler

    from amnesia_sd.model.families import family_of, take
    from amnesia_sd.method.fisher import fisher_diagonal, timestep_set
    from amnesia_sd.model.loading import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(args.model))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, family = pipe.unet, family_of(pipe)
    channels, size = unet.config.in_channels, unet.config.sample_size
    n_all = max(args.samples, args.subset_samples)
    latents = torch.randn((n_all, channels, size, size), generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo number {i}" for i in range(n_all)]
    cond = family.encode_text(pipe, prompts)
    # SDXL's image part: every sample made at the native size, uncropped (none for SD 1.x/2.x).
    image = family.image_conditioning(family.micro_conditioning(size * pipe.vae_scale_factor))
    cond.update({k: v.expand(n_all, *v.shape) for k, v in image.items()})
    full = timestep_set(scheduler.config.num_train_timesteps, None)
    seed = 7

    def ours(count, timesteps):
        return fisher_diagonal(family, unet, scheduler, latents[:count], lambda n: take(cond, slice(n, n + 1)),
                               timesteps, seed, args.timestep_batch_size, progress=False)

    compared = timestep_set(scheduler.config.num_train_timesteps, args.timesteps)
    ours(1, compared[: args.timestep_batch_size])  # warm-up: first-call allocations are not the method's cost
    ours_times = []
    for _ in range(args.repeats):  # ours is short: the median of a few runs evens out a busy machine
        start = time.perf_counter()
        fast = ours(args.samples, compared)
        ours_times.append(time.perf_counter() - start)
    ours_seconds = statistics.median(ours_times)
    start = time.perf_counter()
    slow = reference_fisher(family, unet, scheduler, cond, latents[: args.samples], compared, seed)
    reference_seconds = time.perf_counter() - start
    max_rel_diff = max(((fast[k] - slow[k]).abs().max() / slow[k].abs().max().clamp_min(1e-30)).item() for k in slow)

    # What a subset of K evenly spaced timesteps costs: rank correlation with the full Fisher.
    whole = flat(ours(args.subset_samples, full))
    subsets = {}
    for k in (10, 50, 100, 250):
        part = flat(ours(args.subset_samples, timestep_set(scheduler.config.num_train_timesteps, k)))
        subsets[str(k)] = {
            "spearman_vs_full": round(spearman(part, whole), 4),
            "relative_l2_error": round(((part - whole).norm() / whole.norm()).item(), 4),
            "cost_vs_full": k / len(full),
        }
    print(json.dumps({
        "benchmark": "fisher",
        "model": args.model,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "samples": args.samples,
        "timesteps": len(compared),
        "timestep_batch_size": args.timestep_batch_size,
        "threads": args.threads,
        "reference_seconds": round(reference_seconds, 2),
        "ours_seconds": round(ours_seconds, 2),
        "speedup": round(reference_seconds / ours_seconds, 2),
        "max_rel_diff": max_rel_diff,
        "subset_samples": args.subset_samples,
        "subset": subsets,
    }, indent=2))


if __name__ == "__main__":
    main()
