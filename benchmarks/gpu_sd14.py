"""GPU benchmark at full Stable Diffusion v1.4 size: the SD v1.4 UNet architecture with random
weights (no download) at 512x512 (64x64 latents).

Measures forget-training images per second and peak GPU memory at batch 4 surrogate + 4 replay in
bf16 autocast with gradient checkpointing, 8-bit AdamW (when bitsandbytes is installed) and the
Fisher/anchor in bf16; and Fisher seconds per image with all 1000 timesteps and with 50. Targets:
peak <= 24 GB, >= 20 training images/s on one H100/H200-class GPU, and the Fisher processing at
least as many timestep-samples per second as training processes images.

Without CUDA it prints {"skipped": ...} and exits 0. `--smoke` runs the same code on a tiny UNet on
the CPU (the test suite does this, so the script cannot rot while no GPU is at hand).

    python benchmarks/gpu_sd14.py [--steps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from step import SD14_UNET

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--batch", type=int, default=4, help="surrogate (= replay) images per step")
    parser.add_argument("--timestep-batch-size", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU: checks the code path only")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_sd14", "skipped": "no CUDA device"}))
        return

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from amnesia_sd.diffusion import per_sample_loss
    from amnesia_sd.ewc import EWCPenalty
    from amnesia_sd.fisher import fisher_diagonal, timestep_set

    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if args.smoke else SD14_UNET)).to(device)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    size, b = unet.config.sample_size, args.batch
    params = list(unet.parameters())
    g = torch.Generator().manual_seed(0)

    # Training: bf16 autocast, fp32 master weights, checkpointing, bf16 Fisher and anchor.
    unet.enable_gradient_checkpointing()
    unet.train()
    try:
        import bitsandbytes as bnb

        optimizer, optimizer_name = bnb.optim.AdamW8bit(params, lr=1e-5), "AdamW8bit"
    except ImportError:
        optimizer, optimizer_name = torch.optim.AdamW(params, lr=1e-5), "AdamW (bitsandbytes not installed)"
    penalty = EWCPenalty(params, [torch.rand(p.shape, generator=g).to(device, torch.bfloat16) for p in params],
                         [p.detach().to(torch.bfloat16, copy=True) for p in params], 50.0)
    latents = torch.randn((2 * b, 4, size, size), generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    embeddings = torch.randn((2 * b, 77, 768), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        t = torch.randint(0, 1000, (2 * b,), device=device)
        with autocast:
            losses = per_sample_loss(unet, scheduler, latents, noise, t, embeddings)
        (losses[:b].mean() + losses[b:].mean()).backward()
        penalty.add_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    step()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    train_seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del optimizer, penalty

    # The Fisher of one image: all 1000 timesteps, and a subset of 50; a timestep batch of 64x64
    # latents needs checkpointing to fit (as `amnesia-sd fim --gradient-checkpointing`).
    fisher_seconds = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    embed = lambda n: embeddings[n : n + 1]  # noqa: E731
    full, subset = (20, 5) if args.smoke else (1000, 50)  # the smoke test only proves the code runs
    for count in (full, subset):
        timesteps = timestep_set(1000, count)
        fisher_diagonal(unet, scheduler, latents[:1], embed, timesteps[:8], 0, args.timestep_batch_size,
                        autocast=lambda: autocast, progress=False)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        fisher_diagonal(unet, scheduler, latents[:1], embed, timesteps, 0, args.timestep_batch_size,
                        autocast=lambda: autocast, progress=False)
        synchronize(device)
        fisher_seconds[str(count)] = round(time.perf_counter() - start, 3)
    fisher_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    images_per_second = 2 * b / train_seconds
    timestep_samples_per_second = full / fisher_seconds[str(full)]
    print(json.dumps({
        "benchmark": "gpu_sd14",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke test, tiny UNet)",
        "unet_parameters": sum(p.numel() for p in params),
        "latent_size": size,
        "batch": f"{b}+{b}",
        "optimizer": optimizer_name,
        "train_images_per_second": round(images_per_second, 2),
        "train_seconds_per_step": round(train_seconds, 4),
        "peak_gpu_memory_gb": round(peak / 1e9, 2) if peak is not None else None,
        "fisher_seconds_per_image": fisher_seconds,
        "fisher_timestep_batch_size": args.timestep_batch_size,
        "fisher_peak_gpu_memory_gb": round(fisher_peak / 1e9, 2) if fisher_peak is not None else None,
        "fisher_timestep_samples_per_second": round(timestep_samples_per_second, 1),
        "fisher_vs_training_throughput": round(timestep_samples_per_second / images_per_second, 2),
        "targets": {"peak_gpu_memory_gb": "<= 24", "train_images_per_second": ">= 20",
                    "fisher_vs_training_throughput": ">= 1"},
    }, indent=2))


if __name__ == "__main__":
    main()
