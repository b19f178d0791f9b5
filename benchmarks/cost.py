"""What a UNet pass costs on this machine, and what the README's cost table comes to here.

Builds the SD v1.4 UNet (and, with --sdxl, the SDXL base UNet) with random weights (no download),
times a forward pass at the native latent size with a classifier-free-guidance batch of 2 (one
sampling step of one image), and a forward+backward pass of one image (one Fisher timestep, or one
training image), then multiplies by the pass counts of each step of `forget` with the one-command
defaults and the paper's settings. Prints one JSON object.

    python benchmarks/cost.py [--repeats 2] [--sdxl]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from amnesia_sd.core.config import (DEFAULT_FIM_FRACTION, DEFAULT_FIM_TIMESTEPS, DEFAULT_REPLAY_IMAGES,
                                    DEFAULT_SURROGATE_IMAGES)
from amnesia_sd.core.cost import generation_passes
from unets import SD14_UNET, SDXL_UNET


def counts(replay: int, fim_images: int, fim_timesteps: int, steps: int, batch: int) -> dict[str, tuple[int, int]]:
    """(forward passes, forward+backward passes) of each step of forget."""
    return {
        "replay set": (generation_passes(replay, 50, 7.5), 0),
        "surrogate set": (generation_passes(DEFAULT_SURROGATE_IMAGES, 50, 7.5), 0),
        "Fisher": (0, fim_images * fim_timesteps),
        "forgetting": (0, steps * 2 * batch),
    }


SETTINGS = {
    "one-command defaults": counts(DEFAULT_REPLAY_IMAGES, DEFAULT_REPLAY_IMAGES // DEFAULT_FIM_FRACTION,
                                   DEFAULT_FIM_TIMESTEPS, 1000, 4),
    "paper": counts(5000, 5000, 1000, 12500, 16),
}


def time_passes(config: dict, xl: bool, repeats: int) -> dict[str, float]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    size, tokens, width = config["sample_size"], 77, config["cross_attention_dim"]

    def inputs(batch: int):
        extra = {}
        if xl:
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280),
                                          "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch).float()}
        return (torch.randn(batch, 4, size, size), torch.full((batch,), 500), torch.randn(batch, tokens, width)), extra

    def forward():
        args, extra = inputs(2)
        with torch.no_grad():
            unet(*args, **extra)

    def forward_backward():
        args, extra = inputs(1)
        unet(*args, **extra).sample.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    result = {}
    for name, fn, per in (("forward_s", forward, 2), ("forward_backward_s", forward_backward, 1)):
        if xl and name == "forward_backward_s":
            continue  # activations of a 2.6B UNet at 1024 px do not fit beside it in 24 GiB of RAM
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / per)
        result[name] = min(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sdxl", action="store_true", help="also time the SDXL UNet (2.6B parameters; slow)")
    parser.add_argument("--smoke", action="store_true", help="a tiny UNet: runs this script's code in seconds")
    args = parser.parse_args()
    report = {"threads": torch.get_num_threads(), "models": {}}
    models = [("sd14", SD14_UNET, False), ("sdxl", SDXL_UNET, True)]
    if args.smoke:
        models = [("tiny", {**SD14_UNET, "sample_size": 8, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8,
                            "cross_attention_dim": 32}, False)]
    for name, config, xl in models:
        if xl and not args.sdxl:
            continue
        seconds = time_passes(config, xl, args.repeats)
        fb = seconds.get("forward_backward_s", 3 * seconds["forward_s"])
        table = {}
        for setting, steps in SETTINGS.items():
            rows = {step: {"forward_passes": f, "forward_backward_passes": b,
                           "hours_here": round((f * seconds["forward_s"] + b * fb) / 3600, 1)}
                    for step, (f, b) in steps.items()}
            rows["total_hours_here"] = round(sum(r["hours_here"] for r in rows.values()), 1)
            table[setting] = rows
        report["models"][name] = {"seconds_per_pass": seconds, "cost": table}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
