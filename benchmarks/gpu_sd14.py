"""GPU benchmark at full Stable Diffusion v1.4 size (or, with --sdxl, SDXL base size): the UNet
architecture with random weights (no download) at its native resolution, 512x512 (64x64 latents)
for SD v1.4, 1024x1024 (128x128 latents) for SDXL.

Measures forget-training images per second and peak GPU memory at batch 4 surrogate + 4 replay
(SDXL: 1 + 1) in bf16 autocast with gradient checkpointing, 8-bit AdamW (when bitsandbytes is
installed) and the Fisher/anchor in bf16, all UNet parameters trained; and Fisher seconds per image
with all 1000 timesteps and with 50. Targets (SD v1.4): peak <= 24 GB, >= 20 training images/s on
one H100/H200-class GPU, and the Fisher processing at least as many timestep-samples per second as
training processes images. SDXL has no targets here: its figures are reported as measured.

With --lora-rank R it measures the LoRA SA step instead (the same batch, autocast and
checkpointing): rank-R adapters (alpha = R) on the library's default targets
(to_q,to_k,to_v,to_out.0) in fp32 with their own fp32 AdamW, the frozen base UNet in bf16 (as
`forget --lora-rank R` under bf16 mixed precision), the bf16 Fisher of the adapted weights, and the
LoRA EWC penalty (amnesia_sd.model.ewc.LoraPenalty); training images per second and peak GPU memory, no
Fisher timing (the Fisher is the full model's, as above). No targets: reported as measured.

Without CUDA it prints {"skipped": ...} and exits 0. `--smoke` runs the same code on a tiny UNet
(SD- or, with --sdxl, SDXL-shaped) on the CPU (the test suite does this, so the script cannot rot
while no GPU is at hand).

    python benchmarks/gpu_sd14.py [--steps 10] [--sdxl] [--lora-rank 8] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unets import SD14_UNET, SDXL_UNET, TINY_SDXL_UNET, TINY_UNET, random_conditioning, sd_scheduler  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--batch", type=int, default=None, help="surrogate (= replay) images per step (4; SDXL 1)")
    parser.add_argument("--timestep-batch-size", type=int, default=None, help="the Fisher's (50; SDXL 20)")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL base UNet at 1024x1024 instead of SD v1.4's")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="the LoRA SA step with adapters of this rank instead (no Fisher timing)")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU: checks the code path only")
    args = parser.parse_args()
    name = "sdxl" if args.sdxl else "sd14"
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_sd14", "architecture": name, "skipped": "no CUDA device"}))
        return
    b = args.batch or (1 if args.sdxl else 4)
    timestep_batch_size = args.timestep_batch_size or (20 if args.sdxl else 50)

    from diffusers import UNet2DConditionModel

    from amnesia_sd.model.diffusion import per_sample_loss
    from amnesia_sd.model.ewc import EWCPenalty
    from amnesia_sd.model.families import FAMILIES, take, to_device
    from amnesia_sd.method.fisher import fisher_diagonal, timestep_set

    device = torch.device("cpu" if args.smoke else "cuda")
    config = {(False, False): SD14_UNET, (False, True): SDXL_UNET,
              (True, False): TINY_UNET, (True, True): TINY_SDXL_UNET}[args.smoke, args.sdxl]
    family = FAMILIES["sdxl" if args.sdxl else "sd"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device)
    scheduler = sd_scheduler()
    size = unet.config.sample_size
    params = list(unet.parameters())
    unet_parameters = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(0)

    unet.enable_gradient_checkpointing()
    unet.train()
    if args.lora_rank:
        # LoRA: fp32 adapters and their AdamW, the frozen base in bf16, the bf16 Fisher of the
        # adapted weights (random, made on the device), the penalty on delta W = s B A.
        from types import SimpleNamespace

        from amnesia_sd.core.config import ForgetConfig
        from amnesia_sd.model.trainable import LoraAdapters

        lora_targets = [t for t in ForgetConfig.lora_targets.split(",") if t]
        lora_config = SimpleNamespace(train_method="full", lora_rank=args.lora_rank,
                                      lora_alpha_value=lambda: float(args.lora_rank),
                                      lora_target_list=lambda: lora_targets, fim_dtype="bf16", lambda_ewc=50.0)
        shapes = {n: p.shape for n, p in unet.named_parameters()}
        trainable = LoraAdapters(unet, lora_config)
        trainable.anchor(unet, lambda rows: {n: torch.rand(shapes[n], device=device, dtype=torch.bfloat16)
                                             for n in rows}, device)
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        params, penalty, penalty_bytes = trainable.params, trainable.penalty, trainable.penalty_bytes
        optimizer, optimizer_name = torch.optim.AdamW(params, lr=1e-4), "AdamW (fp32 adapters)"
    else:
        # Training: bf16 autocast, fp32 master weights, checkpointing, bf16 Fisher and anchor.
        try:
            import bitsandbytes as bnb

            optimizer, optimizer_name = bnb.optim.AdamW8bit(params, lr=1e-5), "AdamW8bit"
        except ImportError:
            optimizer, optimizer_name = torch.optim.AdamW(params, lr=1e-5), "AdamW (bitsandbytes not installed)"
        penalty = EWCPenalty(params, [torch.rand(p.shape, generator=g).to(device, torch.bfloat16) for p in params],
                             [p.detach().to(torch.bfloat16, copy=True) for p in params], 50.0)
        penalty_bytes = 2 * 2 * unet_parameters  # F and theta* in bf16
    latents = torch.randn((2 * b, 4, size, size), generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    # The text part of each image's prompt and (SDXL) its micro-conditioning at the native size.
    cond = to_device(random_conditioning(config, 2 * b, g, image_size=8 * size), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        t = torch.randint(0, 1000, (2 * b,), device=device)
        with autocast:
            losses = per_sample_loss(family, unet, scheduler, latents, noise, t, cond)
        (losses[:b].mean() + losses[b:].mean()).backward()
        penalty.add_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = [p.detach().clone() for p in params] if args.lora_rank else None  # adapters: megabytes
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
    images_per_second = 2 * b / train_seconds
    common = {
        "benchmark": "gpu_sd14",
        "architecture": name + (" (tiny)" if args.smoke else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke test, tiny UNet)",
        "unet_parameters": unet_parameters,
        "latent_size": size,
        "image_size": 8 * size,
        "batch": f"{b}+{b}",
        "optimizer": optimizer_name,
        "train_images_per_second": round(images_per_second, 2),
        "train_seconds_per_step": round(train_seconds, 4),
        "peak_gpu_memory_gb": round(peak / 1e9, 2) if peak is not None else None,
        "penalty_state_gb": round(penalty_bytes / 1e9, 3),
    }
    if args.lora_rank:
        print(json.dumps({**common, "mode": "lora", "lora_rank": args.lora_rank, "lora_targets": ",".join(lora_targets),
                          "trainable_parameters": sum(p.numel() for p in params),
                          "base_dtype": "bf16", "adapter_dtype": "fp32",
                          # every adapter got a gradient through the checkpointed bf16 base
                          "adapters_updated": all(not torch.equal(p0, p) for p0, p in zip(before, params)),
                          "targets": None}, indent=2))
        return

    # The Fisher of one image: all 1000 timesteps, and a subset of 50; a timestep batch of 64x64
    # (SDXL: 128x128) latents needs checkpointing to fit (as `amnesia-sd fim --gradient-checkpointing`).
    fisher_seconds = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    embed = lambda n: take(cond, slice(n, n + 1))  # noqa: E731
    full, subset = (20, 5) if args.smoke else (1000, 50)  # the smoke test only proves the code runs
    for count in (full, subset):
        timesteps = timestep_set(1000, count)
        fisher_diagonal(family, unet, scheduler, latents[:1], embed, timesteps[:8], 0, timestep_batch_size,
                        autocast=lambda: autocast, progress=False)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        fisher_diagonal(family, unet, scheduler, latents[:1], embed, timesteps, 0, timestep_batch_size,
                        autocast=lambda: autocast, progress=False)
        synchronize(device)
        fisher_seconds[str(count)] = round(time.perf_counter() - start, 3)
    fisher_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    timestep_samples_per_second = full / fisher_seconds[str(full)]
    targets = None if args.sdxl else {"peak_gpu_memory_gb": "<= 24", "train_images_per_second": ">= 20",
                                      "fisher_vs_training_throughput": ">= 1"}
    print(json.dumps({
        **common,
        "mode": "full",
        "fisher_seconds_per_image": fisher_seconds,
        "fisher_timestep_batch_size": timestep_batch_size,
        "fisher_peak_gpu_memory_gb": round(fisher_peak / 1e9, 2) if fisher_peak is not None else None,
        "fisher_timestep_samples_per_second": round(timestep_samples_per_second, 1),
        "fisher_vs_training_throughput": round(timestep_samples_per_second / images_per_second, 2),
        "targets": targets,
    }, indent=2))


if __name__ == "__main__":
    main()
