"""The GPU check: the README's one-command `forget` end to end on one GPU, on random-weight SD v1.4
at 512 px and SDXL base at 1024 px (the real architectures, built in code: no download), at the
defaults (bf16 on a GPU that has it, the planned batch sizes) with small counts, and per phase the
memory plan's predicted peak against torch.cuda.max_memory_allocated, seconds and UNet passes per
second; then the Fisher in fp16 (loss-scaled) against fp32 on 4 samples.

    python benchmarks/gpu_check.py            # one H100/H200: under 8 minutes; no CUDA: {"skipped": ...}
    python benchmarks/gpu_check.py --smoke    # tiny SD- and SDXL-shaped models on the CPU (the tests)

Counts (SD v1.4): 32 replay images, 8 surrogate images, the Fisher over 8 samples x 50 timesteps,
50 training steps, 50 sampling steps. SDXL at 1024 px samples several times slower: 8 replay
images, 4 surrogate images, 20 sampling steps, the Fisher over 4 samples x 50 timesteps, 20 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unets import SD14_UNET, SDXL_UNET, TINY_SDXL_UNET, TINY_UNET  # noqa: E402

WORDS = ("a an the photo of portrait painting picture brad pitt middle aged man woman dog cat house tree in on "
         "street city mountain river boat car bird flower table chair window").split()
# Full size: SD v1.4's VAE and CLIP ViT-L/14 text encoder; SDXL adds OpenCLIP bigG/14 with its projection.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
COUNTS = {
    "sd14": dict(num_replay_images=32, num_surrogate_images=8, fim_num_images=8, fim_num_timesteps=50,
                 max_train_steps=50, num_inference_steps=50),
    "sdxl": dict(num_replay_images=8, num_surrogate_images=4, fim_num_images=4, fim_num_timesteps=50,
                 max_train_steps=20, num_inference_steps=20),
    "smoke": dict(num_replay_images=4, num_surrogate_images=2, fim_num_images=2, fim_num_timesteps=4,
                  max_train_steps=2, num_inference_steps=2),
}


def build(kind: str, path: Path, smoke: bool) -> Path:
    """A random-weight pipeline of SD v1.4's or SDXL base's classes and sizes (tiny ones with `smoke`)."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from amnesia_sd.model.tokenizer import write_word_tokenizer

    torch.manual_seed(0)
    length = 16 if smoke else 77
    common = dict(max_position_embeddings=length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    tokenizer = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab"), max_length=length)
    common["vocab_size"] = len(tokenizer)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    vae_size = TINY_VAE if smoke else (SDXL_VAE if kind == "sdxl" else SD_VAE)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_size["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_size["block_out_channels"]), **vae_size)
    if kind == "sd14":
        unet = UNet2DConditionModel(**(dict(TINY_UNET, cross_attention_dim=32) if smoke else SD14_UNET))
        text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if smoke else CLIP_L), **common))
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        tokenizer_2 = write_word_tokenizer(WORDS, path.with_name(path.name + "-vocab-2"), max_length=length)
        unet = UNet2DConditionModel(**(TINY_SDXL_UNET if smoke else SDXL_UNET))
        text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if smoke else CLIP_L), **common))
        big = dict(TINY_CLIP, projection_dim=24) if smoke else CLIP_G
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**big, **common))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


class Phases:
    """Wraps the one-command path's phases (amnesia_sd.method.sources' set generation and Fisher) to read
    seconds and the device's peak per phase; training is what follows the Fisher."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.mark = device, [], None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.mark = time.time()

    def close(self, phase: str, passes: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.mark
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        self.rows.append({"phase": phase, "max_memory_allocated_gib": peak, "seconds": round(seconds, 1),
                          "unet_passes_per_s": round(passes / seconds, 2)})

    def wrap(self, module, name: str, phase, passes):
        """Measure each call of module.name; returns what undoes it."""
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            self.reset()
            result = real(*args, **kwargs)
            self.close(phase(args, kwargs), passes(args, kwargs))
            self.reset()  # training (or the next phase) starts here
            return result

        setattr(module, name, wrapped)
        return lambda: setattr(module, name, real)


def predicted(lines: str) -> dict[str, float]:
    """The memory-plan lines' predicted peaks in GiB, by phase ('sampling', 'the Fisher', 'training')."""
    found = {}
    for what, number, unit in re.findall(r"memory plan of ([A-Za-z ]+?):.*?predicted peak ([0-9.]+) (GiB|MiB)", lines):
        found[what] = max(found.get(what, 0.0), float(number) / (1024 if unit == "MiB" else 1))
    return found


def one_command(kind: str, root: Path, device: torch.device, smoke: bool) -> dict:
    from amnesia_sd.method import sources
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.core.cost import generation_passes
    from amnesia_sd.commands.forget import forget

    counts = COUNTS["smoke" if smoke else kind]
    model = build(kind, root / kind, smoke)
    phases = Phases(device)
    steps = counts["num_inference_steps"]
    undo = [phases.wrap(sources, "generate_image_set", lambda a, k: f"sampling the {a[5]} set",
                        lambda a, k: generation_passes(len(a[2]), steps, 7.5)),
            phases.wrap(sources, "write_fisher_of_set", lambda a, k: "the Fisher",
                        lambda a, k: a[3] * counts["fim_num_timesteps"])]
    config = ForgetConfig(model=str(model), concept="brad pitt", surrogate="a middle aged man",
                          output_dir=str(root / f"{kind}-forgotten"), checkpointing_steps=10**6, **counts)
    said = io.StringIO()
    os.environ["AMNESIA_SD_CACHE"] = str(root / "cache")
    phases.reset()
    try:
        with contextlib.redirect_stdout(said):
            out = forget(config)
    finally:
        for restore in undo:
            restore()
    record = json.loads((out / "amnesia.json").read_text())
    phases.close("training", record["steps"] * 2 * config.train_batch_size)
    print(said.getvalue(), file=sys.stderr)
    plan = predicted(said.getvalue())
    for row in phases.rows:
        key = "sampling" if row["phase"].startswith("sampling") else row["phase"]
        row["predicted_peak_gib"] = plan.get(key)
    return {"mixed_precision": record["mixed_precision"], "final_losses": record["final_losses"],
            "skipped_steps": record["skipped_steps"], "phases": phases.rows, "model": str(model)}


def fisher_agreement(model: Path, device: torch.device, samples: int, timesteps: int) -> dict:
    """The Fisher of one UNet over the same samples and noise in fp32 and in fp16 autocast with loss
    scaling: how far apart, and how many entries fp16 zeroed."""
    from amnesia_sd.model.families import family_of
    from amnesia_sd.method.fisher import FP16_LOSS_SCALE, fisher_diagonal, timestep_set
    from amnesia_sd.model.loading import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(str(model))).to(device)
    family = family_of(pipe)
    size = pipe.unet.config.sample_size
    latents = torch.randn((samples, 4, size, size), generator=torch.Generator().manual_seed(0))
    cond = family.encode_text(pipe, ["a photo of a dog"])
    ts = timestep_set(1000, timesteps)
    args = (family, pipe.unet, pipe.scheduler, latents, lambda n: cond, ts, 0, 10)
    exact = fisher_diagonal(*args, progress=False)
    half = fisher_diagonal(*args, progress=False, loss_scale=FP16_LOSS_SCALE,
                           autocast=lambda: torch.autocast(device.type, dtype=torch.float16))
    a = torch.cat([v.flatten() for v in exact.values()])
    b = torch.cat([v.flatten() for v in half.values()])
    return {"samples": samples, "timesteps": timesteps, "relative_error": ((a - b).norm() / a.norm()).item(),
            "entries_zeroed_by_fp16": int(((b == 0) & (a > 0)).sum()), "entries": a.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code path only")
    parser.add_argument("--only", choices=("sd14", "sdxl"), help="one of the two models")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_check", "skipped": "no CUDA device"}))
        return
    device = torch.device("cpu" if args.smoke else "cuda")
    started, results = time.time(), {}
    with tempfile.TemporaryDirectory(prefix="amnesia-gpu-check-") as tmp:
        for kind in [args.only] if args.only else ["sd14", "sdxl"]:
            results[kind] = one_command(kind, Path(tmp), device, args.smoke)
            if kind == "sd14":
                results[kind]["fp16_vs_fp32_fisher"] = fisher_agreement(Path(results[kind]["model"]), device, 4,
                                                                        4 if args.smoke else 50)
            del results[kind]["model"]
    print(json.dumps({"benchmark": "gpu_check", "device": torch.cuda.get_device_name() if device.type == "cuda"
                      else "cpu (smoke)", "torch": torch.__version__, "seconds": round(time.time() - started, 1),
                      **results}))


if __name__ == "__main__":
    main()
