"""Step benchmark: one Selective Amnesia optimizer step (surrogate + replay + EWC penalty) against
one plain diffusion fine-tuning step on the same 2x batch and the same model.

Each variant runs in its own process so its peak memory (max RSS) is its own; the SA processes
alternate plain and SA steps so a busy machine slows both alike. Reported as ratios taken in this
run: time_ratio = SA seconds / plain seconds per step (median over alternating steps, plus the
penalty value's amortised cost), extra_peak_mem_over_param_bytes = (SA peak - plain peak) /
(UNet parameters x 4 bytes), and penalty_state_over_param_bytes = (F + theta* bytes) / the same.
Models: the digits model, and the full SD v1.4 UNet architecture with random weights (no
download) at a small latent size on the CPU.

    python benchmarks/step.py [--model digits] [--sd14-latent 16] [--skip-sd14]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The UNet of CompVis/stable-diffusion-v1-4 (its unet/config.json), built with random weights.
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def build_unet(model: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if model == "sd14":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD14_UNET)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        return unet, scheduler, 77, 768
    from amnesia_sd.models import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(model))
    tokens = pipe.tokenizer.model_max_length
    return pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), tokens, pipe.text_encoder.config.hidden_size


def worker(args) -> dict:
    """Run warm-up + timed steps of one variant; report seconds per step and peak RSS."""
    from amnesia_sd.diffusion import per_sample_loss
    from amnesia_sd.ewc import EWCPenalty
    from amnesia_sd.forget import LOG_EVERY
    from amnesia_sd.models import DTYPES

    torch.set_num_threads(args.threads)
    unet, scheduler, tokens, width = build_unet(args.model)
    unet.train()
    params = [p for p in unet.parameters()]
    size = args.latent or unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    b = args.batch
    # The same 2b batch for both variants: for SA, b surrogate + b replay images.
    latents = torch.randn((2 * b, 4, size, size), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    embeddings = torch.randn((2 * b, tokens, width), generator=g)
    timesteps = torch.randint(0, 1000, (2 * b,), generator=g)
    optimizer = (torch.optim.SGD(params, lr=1e-6) if args.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=1e-6))
    penalty = None
    if args.variant != "plain":
        dtype = DTYPES[args.variant.removeprefix("sa_")] if args.variant != "sa" else torch.float32
        penalty = EWCPenalty(params, [torch.rand(p.shape, generator=g, dtype=dtype) for p in params],
                             [p.detach().to(dtype, copy=True) for p in params], 50.0)

    def step(with_penalty: bool) -> float:
        start = time.perf_counter()
        losses = per_sample_loss(unet, scheduler, latents, noise, timesteps, embeddings)
        loss = losses[:b].mean() + losses[b:].mean() if with_penalty else losses.mean()
        loss.backward()
        if with_penalty:
            penalty.add_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # Plain and SA steps alternate in one process, so a busy machine slows both alike; the plain
    # variant's own process is there for its peak memory.
    variants = (False, True) if penalty else (False,)
    for with_penalty in variants:
        step(with_penalty)  # warm-up
    times = {v: [] for v in variants}
    for _ in range(args.steps):
        for with_penalty in variants:
            times[with_penalty].append(step(with_penalty))
    result = {"plain_seconds_per_step": statistics.median(times[False])}
    if penalty:  # training reads the penalty's value every LOG_EVERY steps, in the gradient's pass
        with_value, without = [], []
        for _ in range(3):
            for timings, flag in ((with_value, True), (without, False)):
                start = time.perf_counter()
                penalty.add_grad_(with_value=flag)
                timings.append(time.perf_counter() - start)
        value_seconds = max(0.0, statistics.median(with_value) - statistics.median(without))
        result["sa_seconds_per_step"] = statistics.median(times[True]) + value_seconds / LOG_EVERY
    return {**result, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "param_bytes": 4 * sum(p.numel() for p in params),
            "penalty_state_bytes": sum(t.numel() * t.element_size() for t in penalty.fisher + penalty.anchors)
            if penalty else 0}


def run_variant(model, variant, args, **extra) -> dict:
    options = {"--model": model, "--variant": variant, "--threads": str(args.threads), **extra}
    command = [sys.executable, __file__, "--worker", *[x for kv in options.items() for x in kv]]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model, args, **extra) -> dict:
    plain = run_variant(model, "plain", args, **extra)
    result = {}
    for variant in ("sa", "sa_bf16"):
        sa = run_variant(model, variant, args, **extra)
        key = "" if variant == "sa" else "_bf16"
        result[f"time_ratio{key}"] = round(sa["sa_seconds_per_step"] / sa["plain_seconds_per_step"], 3)
        result[f"extra_peak_mem_over_param_bytes{key}"] = round(
            (sa["max_rss_bytes"] - plain["max_rss_bytes"]) / plain["param_bytes"], 3)
        # F and theta* themselves: the floor under the extra memory (2x in fp32, 1x in bf16).
        result[f"penalty_state_over_param_bytes{key}"] = round(sa["penalty_state_bytes"] / plain["param_bytes"], 3)
        result[f"sa{key}_seconds_per_step"] = round(sa["sa_seconds_per_step"], 4)
        result[f"plain{key}_seconds_per_step"] = round(sa["plain_seconds_per_step"], 4)
    result["param_bytes"] = plain["param_bytes"]
    result.update({k.lstrip("-"): v for k, v in extra.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--variant", default="plain")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help="surrogate (= replay) images per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sd14-latent", type=int, default=16)
    parser.add_argument("--sd14-batch", type=int, default=1)
    parser.add_argument("--sd14-steps", type=int, default=3)
    parser.add_argument("--skip-sd14", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = {"benchmark": "step", "model": args.model, "threads": args.threads,
              **compare(args.model, args, **{"--batch": str(args.batch), "--steps": str(args.steps)})}
    if not args.skip_sd14:
        # AdamW's state for 860M parameters does not fit beside the Fisher in 24 GiB: plain SGD
        # here, the same optimizer for both variants.
        report["sd14_cpu"] = compare("sd14", args, **{"--batch": str(args.sd14_batch), "--steps": str(args.sd14_steps),
                                                      "--latent": str(args.sd14_latent), "--optimizer": "sgd"})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
