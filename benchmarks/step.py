"""Step benchmark: one Selective Amnesia optimizer step (surrogate + replay + EWC penalty) against
one plain diffusion fine-tuning step on the same 2x batch and the same model.

Each variant runs in its own process so its peak memory (max RSS) is its own; the SA processes
alternate plain and SA steps so a busy machine slows both alike. Reported as ratios taken in this
run: time_ratio = SA seconds / plain seconds per step (median over alternating steps, plus the
penalty value's amortised cost), time_ratio_from_penalty_seconds = 1 + the penalty's gradient
timed alone / plain seconds (a cross-check that other load on the machine moves less: the penalty
is all an SA step adds), extra_peak_mem_over_param_bytes = (SA peak - plain peak) / (trained
parameters x 4 bytes), and penalty_state_over_param_bytes = (F + theta* bytes) / the same.
Models: the digits model (all parameters trained), and on the CPU with random weights (no download)
at a small latent size:

- sd14_cpu: the full SD v1.4 UNet architecture, all 860M parameters trained (--train-method full);
- sdxl_cpu: the SDXL base UNet architecture, its cross-attention trained (--train-method xattn).
  The whole SDXL UNet has 2.57B parameters (10.3 GB in fp32): weights + gradients + Fisher + anchor
  of all of them (41 GB) do not fit in this machine's 24 GiB, so both variants of this row train
  only the cross-attention (attn2) parameters, requires_grad False elsewhere; the optimizer, the
  gradients, F and theta* cover those alone, as `forget --train-method xattn` does. The row's
  memory ratios are therefore over the trained parameters' bytes, and say so in their names
  (..._over_trained_param_bytes), beside trainable_parameters and unet_parameters.

The flow-matching transformers (amnesia_sd/model/families.py's "sd3" and "flux"), SGD as above (no
optimizer state: memory is tight), batch 1+1, the family's training scheduler, timesteps and
per_sample_loss as forget uses them, and the real text lengths (SD3: 77 CLIP + 256 T5 rows; Flux:
512 T5 rows, guidance 3.5), which dominate attention at these small latents. unet_parameters is
then the transformer's. Each row's "depth" field says how many of the architecture's blocks it
builds, and "reduced" where fewer:

- sd3m_cpu: the SD3-medium transformer at full depth (24 joint blocks, 2.03B parameters), --sd3-latent
  (16: 16x16 latents, 64 image tokens), LoRA only (its "lora" key; --skip-lora leaves the row out):
  its full-weight SA step (fp32 weights + gradients + F + theta*: 32 GB, 48 GB with AdamW) does not
  fit in 24 GiB, so the LoRA row has no full SA step to compare with (no lora_peak_over_full_sa_peak).
- sd3m_reduced_cpu: the same transformer REDUCED to --sd3-layers (4) of its 24 joint blocks, real
  widths (329M parameters): full weights, all trained, and LoRA, as sd14_cpu.
- flux_reduced_cpu: the FLUX.1-dev transformer (11.9B parameters: its bf16 weights alone are 23.8
  GB, of 24 GiB) REDUCED to --flux-layers (1) of its 19 double-stream and --flux-single-layers (2) of its
  38 single-stream blocks, real widths (687M parameters), --flux-latent (16, even: Flux packs 2x2
  patches), full weights, all trained, and LoRA, as sd14_cpu.

--smoke builds every architecture row on a tiny UNet or transformer (the code path only).

LoRA (the digits, sd14_cpu and transformer rows, under their key "lora"; --skip-lora leaves it
out): rank --lora-rank (8) adapters on the library's default targets (to_q,to_k,to_v,to_out.0),
alpha = rank, fp32 base, adapters and Fisher, the row's optimizer; the penalty is
amnesia_sd.model.ewc.LoraPenalty (EWC on delta W = s B A, the frozen base weight being the anchor),
built by the library's own LoraAdapters with a random Fisher. Two more worker processes:

- lora_plain: plain LoRA fine-tuning, b surrogate images a step (no replay, no EWC): its peak;
- lora_sa: the LoRA SA step (b surrogate + b replay images, the penalty), alternating in one
  process with the plain LoRA step of b images and, as a cross-check, a plain LoRA step of the
  same 2b images (so load slows all alike).

lora_time_ratio = LoRA SA seconds / plain LoRA seconds, the plain step being LoRA fine-tuning on
the b surrogate images alone (no EWC, no replay): the ratio includes the replay images' forward
and backward, which double the images of a step, so it stays well above 1 whatever the penalty
costs (1.66-1.70 measured); its target is <= 1.15. lora_time_ratio_same_batch = LoRA SA / plain
LoRA on the same 2b images: what the penalty alone adds (..._from_penalty_seconds is its
cross-check, as in the full rows). lora_peak_over_full_sa_peak = the LoRA SA process's peak RSS /
the row's full SA process's (fp32 Fisher and anchor); its target is <= 0.5 on sd14_cpu.
lora_time_over_full_sa_time is informative (different processes).

    python benchmarks/step.py [--model digits] [--sd14-latent 16] [--sdxl-latent 16]
                              [--skip-model] [--skip-sd14] [--skip-sdxl] [--skip-lora] [--lora-rank 8]
                              [--sd3-latent 16] [--sd3-layers 4] [--skip-sd3] [--skip-sd3-reduced]
                              [--flux-latent 16] [--flux-layers 1] [--flux-single-layers 2] [--skip-flux]
                              [--smoke]
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

from unets import (FLUX1_TRANSFORMER, SCHEDULERS, SD3_MEDIUM_TRANSFORMER, SD14_UNET, SDXL_UNET,  # noqa: E402
                   TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER, TINY_SDXL_UNET, TINY_UNET, random_conditioning)

# name: (family, diffusers class, config). The tiny ones stand in for the others under --smoke.
ARCHITECTURES = {"sd14": ("sd", "UNet2DConditionModel", SD14_UNET),
                 "sdxl": ("sdxl", "UNet2DConditionModel", SDXL_UNET),
                 "sd3m": ("sd3", "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER),
                 "flux1": ("flux", "FluxTransformer2DModel", FLUX1_TRANSFORMER),
                 "tiny_sd14": ("sd", "UNet2DConditionModel", TINY_UNET),
                 "tiny_sdxl": ("sdxl", "UNet2DConditionModel", TINY_SDXL_UNET),
                 "tiny_sd3m": ("sd3", "SD3Transformer2DModel", TINY_SD3_TRANSFORMER),
                 "tiny_flux1": ("flux", "FluxTransformer2DModel", TINY_FLUX_TRANSFORMER)}
# The transformer rows' blocks: (config key, what the report calls them), for the "depth" field.
BLOCKS = {"sd3": (("num_layers", "joint blocks"),),
          "flux": (("num_layers", "double-stream blocks"), ("num_single_layers", "single-stream blocks"))}


def build_denoiser(model: str, depth: dict | None = None):
    """(family, denoiser, training scheduler, tokens): an architecture with random weights (`depth`:
    config values that replace its number of blocks), or a model's denoiser (UNet or transformer).
    The scheduler is the family's training_scheduler, as forget builds it."""
    import diffusers

    from amnesia_sd.model.families import FAMILIES, family_of

    if model in ARCHITECTURES:
        name, cls, config = ARCHITECTURES[model]
        family = FAMILIES[name]
        torch.manual_seed(0)
        denoiser = getattr(diffusers, cls)(**{**config, **(depth or {})})
        return family, denoiser, family.training_scheduler(SCHEDULERS[name]), 77
    from amnesia_sd.model.loading import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(model))
    family = family_of(pipe)
    return (family, family.denoiser_of(pipe), family.training_scheduler(pipe.scheduler.config),
            pipe.tokenizer.model_max_length)


LAMBDA = 50.0


def add_lora(unet, args, generator):
    """The library's LoraAdapters (rank --lora-rank, alpha = rank, default targets, fp32) on this
    UNet, with a random non-negative Fisher for the adapted weights."""
    from types import SimpleNamespace

    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.model.trainable import LoraAdapters

    targets = [t for t in ForgetConfig.lora_targets.split(",") if t]
    config = SimpleNamespace(train_method=args.train_method, lora_rank=args.lora_rank,
                             lora_alpha_value=lambda: float(args.lora_rank), lora_target_list=lambda: targets,
                             fim_dtype="fp32", lambda_ewc=LAMBDA)
    shapes = {name: p.shape for name, p in unet.named_parameters()}
    adapters = LoraAdapters(unet, config)
    adapters.anchor(unet, lambda rows: {n: torch.rand(shapes[n], generator=generator) for n in rows}, "cpu")
    return adapters


def worker(args) -> dict:
    """Run warm-up + timed steps of one variant; report seconds per step and peak RSS."""
    from amnesia_sd.model.diffusion import per_sample_loss
    from amnesia_sd.model.ewc import EWCPenalty
    from amnesia_sd.commands.forget import LOG_EVERY
    from amnesia_sd.model.loading import DTYPES
    from amnesia_sd.model.trainable import trainable_names

    torch.set_num_threads(args.threads)
    depth = {k: v for k, v in (("num_layers", args.num_layers), ("num_single_layers", args.num_single_layers))
             if v is not None}
    family, unet, scheduler, tokens = build_denoiser(args.model, depth)
    g = torch.Generator().manual_seed(0)
    lora = args.variant.startswith("lora")
    penalty, penalty_state_bytes = None, 0
    if lora:
        adapters = add_lora(unet, args, g)
        params = adapters.params  # the adapters (requires_grad False on every base weight)
        if args.variant == "lora_sa":
            penalty, penalty_state_bytes = adapters.penalty, adapters.penalty_bytes
    else:
        trained = set(trainable_names(unet, args.train_method))
        for name, p in unet.named_parameters():
            p.requires_grad_(name in trained)
        params = [p for p in unet.parameters() if p.requires_grad]  # all that the optimizer and the penalty see
    unet.train()
    size = args.latent or unet.config.get("sample_size", 128)  # Flux's config has none: 1024 px
    if size % 2 and family.name == "flux":
        raise SystemExit(f"--latent {size}: Flux packs latents in 2x2 patches, its sides must be even")
    b = args.batch
    # The same 2b batch for every variant: for SA, b surrogate + b replay images; the plain LoRA
    # step takes the first b (surrogate only). Timesteps drawn as training draws them (uniform for
    # DDPM and Flux, logit-normal for SD3).
    latents = torch.randn((2 * b, family.latent_channels(unet.config), size, size), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    cond = random_conditioning(dict(unet.config), 2 * b, g, image_size=8 * size, tokens=tokens, family=family.name)
    timesteps = family.draw_timesteps(scheduler, 2 * b, g)
    optimizer = (torch.optim.SGD(params, lr=1e-6) if args.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=1e-6))
    if args.variant in ("sa", "sa_fp32", "sa_bf16", "sa_fp16"):
        dtype = DTYPES[args.variant.removeprefix("sa_")] if args.variant != "sa" else torch.float32
        penalty = EWCPenalty(params, [torch.rand(p.shape, generator=g, dtype=dtype) for p in params],
                             [p.detach().to(dtype, copy=True) for p in params], LAMBDA)
        penalty_state_bytes = sum(t.numel() * t.element_size() for t in penalty.fisher + penalty.anchors)

    def step(images: int, with_penalty: bool) -> float:
        """One optimizer step on the first `images` of the batch; with the penalty, SA's loss (the
        mean over b surrogate images + the mean over b replay images) and the EWC gradient."""
        start = time.perf_counter()
        losses = per_sample_loss(family, unet, scheduler, latents[:images], noise[:images], timesteps[:images],
                                 {k: v[:images] for k, v in cond.items()})
        loss = losses[:b].mean() + losses[b:].mean() if with_penalty else losses.mean()
        loss.backward()
        if with_penalty:
            penalty.add_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # The step kinds of this variant, (images, with penalty) by name. The SA processes alternate
    # their plain and SA steps, so a busy machine slows both alike; the plain variants' own
    # processes are there for their peak memory.
    kinds = {"plain": {"plain": (2 * b, False)},
             "lora_plain": {"lora_plain": (b, False)},
             "lora_sa": {"lora_plain": (b, False), "lora_plain_same_batch": (2 * b, False),
                         "lora_sa": (2 * b, True)}}.get(args.variant, {"plain": (2 * b, False), "sa": (2 * b, True)})
    for kind in kinds.values():
        step(*kind)  # warm-up
    times = {name: [] for name in kinds}
    for _ in range(args.steps):
        for name, kind in kinds.items():
            times[name].append(step(*kind))
    result = {f"{name}_seconds_per_step": statistics.median(t) for name, t in times.items()}
    if penalty:  # training reads the penalty's value every LOG_EVERY steps, in the gradient's pass
        with_value, without = [], []
        for _ in range(3):
            for timings, flag in ((with_value, True), (without, False)):
                start = time.perf_counter()
                penalty.add_grad_(with_value=flag)
                timings.append(time.perf_counter() - start)
        value_seconds = max(0.0, statistics.median(with_value) - statistics.median(without))
        sa = "lora_sa" if lora else "sa"
        result[f"{sa}_seconds_per_step"] += value_seconds / LOG_EVERY
        # All an SA step adds to a plain one of the same images is the penalty's gradient (the loss
        # is the same sum): timed alone it is short, so it gives a cross-check that load on a
        # shared machine barely moves.
        result["penalty_seconds_per_step"] = statistics.median(without) + value_seconds / LOG_EVERY
    trainable = sum(p.numel() for p in params)
    return {**result, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "param_bytes": 4 * trainable, "trainable_parameters": trainable,
            "unet_parameters": sum(p.numel() for p in unet.parameters()) - (trainable if lora else 0),
            "penalty_state_bytes": penalty_state_bytes}


def run_variant(model, variant, args, **extra) -> dict:
    options = {"--model": model, "--variant": variant, "--threads": str(args.threads), **extra}
    command = [sys.executable, __file__, "--worker", *[x for kv in options.items() for x in kv]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model} {variant} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def depth_of(model: str, extra: dict) -> str:
    """A transformer row's depth: its blocks of each kind, of the architecture's, "reduced" where fewer."""
    family, _, config = ARCHITECTURES[model]
    kinds = [(int(extra.get("--" + key.replace("_", "-"), config[key])), config[key], what)
             for key, what in BLOCKS[family]]
    words = " and ".join(f"{n} of {total} {what}" for n, total, what in kinds)
    reduced = any(n < total for n, total, _ in kinds)
    return words + (" (reduced; the architecture's widths)" if reduced else " (full depth)")


def compare(model, args, lora=False, full=True, **extra) -> dict:
    """A row: the full-weight SA step against a plain step (`full`), and the LoRA rows (`lora`)."""
    result = {"depth": depth_of(model, extra)} if ARCHITECTURES.get(model, ("",))[0] in BLOCKS else {}
    if not full:  # LoRA only: the full-weight steps do not fit in memory (the docstring)
        result.update({k.lstrip("-").replace("-", "_"): v for k, v in extra.items()})
        result["lora"] = compare_lora(model, args, None, **extra)
        return result
    plain = run_variant(model, "plain", args, **extra)
    # Memory is counted against the bytes of the parameters that train (all of them but in the
    # sdxl row): the key names say which when only part of the UNet trains.
    partial = plain["trainable_parameters"] != plain["unet_parameters"]
    basis = "trained_param_bytes" if partial else "param_bytes"
    full_sa = None
    for variant in ("sa", "sa_bf16"):
        sa = run_variant(model, variant, args, **extra)
        full_sa = full_sa or sa  # fp32 Fisher and anchor: the LoRA rows' reference
        key = "" if variant == "sa" else "_bf16"
        result[f"time_ratio{key}"] = round(sa["sa_seconds_per_step"] / sa["plain_seconds_per_step"], 3)
        result[f"extra_peak_mem_over_{basis}{key}"] = round(
            (sa["max_rss_bytes"] - plain["max_rss_bytes"]) / plain["param_bytes"], 3)
        # F and theta* themselves: the floor under the extra memory (2x in fp32, 1x in bf16).
        result[f"penalty_state_over_{basis}{key}"] = round(sa["penalty_state_bytes"] / plain["param_bytes"], 3)
        result[f"sa{key}_seconds_per_step"] = round(sa["sa_seconds_per_step"], 4)
        result[f"plain{key}_seconds_per_step"] = round(sa["plain_seconds_per_step"], 4)
        result[f"penalty{key}_seconds_per_step"] = round(sa["penalty_seconds_per_step"], 4)
        result[f"time_ratio{key}_from_penalty_seconds"] = round(
            1 + sa["penalty_seconds_per_step"] / sa["plain_seconds_per_step"], 3)
        result[f"sa{key}_peak_rss_gb"] = round(sa["max_rss_bytes"] / 1e9, 2)
    result["plain_peak_rss_gb"] = round(plain["max_rss_bytes"] / 1e9, 2)
    result[basis] = plain["param_bytes"]
    result["trainable_parameters"] = plain["trainable_parameters"]
    result["unet_parameters"] = plain["unet_parameters"]
    result.update({k.lstrip("-").replace("-", "_"): v for k, v in extra.items()})
    if lora and not args.skip_lora:
        result["lora"] = compare_lora(model, args, full_sa, **extra)
    return result


def compare_lora(model, args, full_sa, **extra) -> dict:
    """A LoRA SA step against a plain LoRA step (b surrogate images, no replay, no EWC), taken in
    one process, and against the row's full SA step (its own process, fp32 Fisher and anchor)."""
    options = {**extra, "--lora-rank": str(args.lora_rank)}
    plain = run_variant(model, "lora_plain", args, **options)
    sa = run_variant(model, "lora_sa", args, **options)
    seconds = sa["lora_sa_seconds_per_step"]
    result = {
        "rank": args.lora_rank,
        "trainable_parameters": sa["trainable_parameters"],
        "unet_parameters": sa["unet_parameters"],  # the frozen base denoiser's
        "lora_sa_seconds_per_step": round(seconds, 4),
        "lora_plain_seconds_per_step": round(sa["lora_plain_seconds_per_step"], 4),
        # Includes the replay images' forward and backward: the SA step has 2b images, the plain one b.
        "lora_time_ratio": round(seconds / sa["lora_plain_seconds_per_step"], 3),
        # The same 2b images without the penalty: what the penalty alone adds.
        "lora_plain_same_batch_seconds_per_step": round(sa["lora_plain_same_batch_seconds_per_step"], 4),
        "lora_time_ratio_same_batch": round(seconds / sa["lora_plain_same_batch_seconds_per_step"], 3),
        "lora_penalty_seconds_per_step": round(sa["penalty_seconds_per_step"], 4),
        # The cross-check of the full rows: 1 + the penalty timed alone / the same-batch plain step.
        "lora_time_ratio_same_batch_from_penalty_seconds": round(
            1 + sa["penalty_seconds_per_step"] / sa["lora_plain_same_batch_seconds_per_step"], 3),
        "lora_sa_peak_rss_gb": round(sa["max_rss_bytes"] / 1e9, 2),
        "lora_plain_peak_rss_gb": round(plain["max_rss_bytes"] / 1e9, 2),
        "lora_penalty_state_bytes": sa["penalty_state_bytes"],  # F of the adapted weights (fp32); no theta*
        "targets": {"lora_peak_over_full_sa_peak": "<= 0.5 (sd14_cpu)", "lora_time_ratio": "<= 1.15"},
    }
    if full_sa is None:  # a LoRA-only row: no full SA step to compare with
        result["full_sa"] = "not run: its weights, gradients, Fisher and anchor do not fit in 24 GiB"
    else:
        result.update(full_sa_peak_rss_gb=round(full_sa["max_rss_bytes"] / 1e9, 2),
                      lora_peak_over_full_sa_peak=round(sa["max_rss_bytes"] / full_sa["max_rss_bytes"], 3),
                      lora_time_over_full_sa_time=round(seconds / full_sa["sa_seconds_per_step"], 3))
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
    parser.add_argument("--train-method", default="full", choices=("full", "noxattn", "xattn"),
                        help="the --model row's trained parameters (the architecture rows set their own)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-model", action="store_true", help="no --model row: the architecture rows only")
    parser.add_argument("--sd14-latent", type=int, default=16)
    parser.add_argument("--sd14-batch", type=int, default=1)
    parser.add_argument("--sd14-steps", type=int, default=3)
    parser.add_argument("--skip-sd14", action="store_true")
    parser.add_argument("--sdxl-latent", type=int, default=16)
    parser.add_argument("--sdxl-batch", type=int, default=1)
    parser.add_argument("--sdxl-steps", type=int, default=3)
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--sd3-latent", type=int, default=16, help="the SD3 rows' latent side (16: 128 px)")
    parser.add_argument("--sd3-batch", type=int, default=1)
    parser.add_argument("--sd3-steps", type=int, default=3)
    parser.add_argument("--sd3-layers", type=int, default=4,
                        help="sd3m_reduced_cpu's joint blocks (SD3-medium has 24; the full-weight row must fit)")
    parser.add_argument("--skip-sd3", action="store_true", help="no sd3m_cpu (full depth, LoRA only)")
    parser.add_argument("--skip-sd3-reduced", action="store_true", help="no sd3m_reduced_cpu")
    parser.add_argument("--flux-latent", type=int, default=16, help="flux_reduced_cpu's latent side (even)")
    parser.add_argument("--flux-batch", type=int, default=1)
    parser.add_argument("--flux-steps", type=int, default=3)
    parser.add_argument("--flux-layers", type=int, default=1, help="flux_reduced_cpu's double-stream blocks (of 19)")
    parser.add_argument("--flux-single-layers", type=int, default=2,
                        help="flux_reduced_cpu's single-stream blocks (of 38)")
    parser.add_argument("--skip-flux", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None, help=argparse.SUPPRESS)  # the worker's depth
    parser.add_argument("--num-single-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="every architecture row on a tiny UNet or transformer: checks the code path only")
    parser.add_argument("--skip-lora", action="store_true",
                        help="no LoRA rows (digits, sd14_cpu and the transformer rows'; sd3m_cpu is LoRA only)")
    parser.add_argument("--lora-rank", type=int, default=8, help="the LoRA rows' adapter rank")
    args = parser.parse_args()
    if args.flux_latent % 2:
        parser.error("--flux-latent must be even: Flux packs latents in 2x2 patches")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = {"benchmark": "step", "threads": args.threads, **({"smoke": "tiny architectures"} if args.smoke else {})}

    def arch(name: str) -> str:
        return "tiny_" + name if args.smoke else name

    if not args.skip_model:
        report.update(model=args.model, **compare(args.model, args, lora=True, **{
            "--batch": str(args.batch), "--steps": str(args.steps), "--train-method": args.train_method}))
    # AdamW's state for 860M parameters does not fit beside the Fisher in 24 GiB: plain SGD in the
    # architecture rows, the same optimizer for both variants.
    if not args.skip_sd14:
        report["sd14_cpu"] = compare(arch("sd14"), args, lora=True, **{
            "--batch": str(args.sd14_batch), "--steps": str(args.sd14_steps), "--latent": str(args.sd14_latent),
            "--optimizer": "sgd"})
    if not args.skip_sdxl:
        # Cross-attention only: the whole 2.57B-parameter UNet's weights, gradients, F and theta*
        # do not fit in 24 GiB (the docstring).
        report["sdxl_cpu"] = compare(arch("sdxl"), args, **{
            "--batch": str(args.sdxl_batch), "--steps": str(args.sdxl_steps), "--latent": str(args.sdxl_latent),
            "--optimizer": "sgd", "--train-method": "xattn"})
    # The transformers, SGD as above, their real text lengths (SD3 77 + 256 rows, Flux 512). SD3-medium
    # (2.03B parameters) at full depth: LoRA only, its full-weight SA step (weights, gradients, F and
    # theta*: 32 GB) does not fit; at --sd3-layers blocks, full weights and LoRA. FLUX.1 (11.9B: its bf16
    # weights alone are 23.8 GB) at --flux-layers + --flux-single-layers blocks, full weights and LoRA.
    sd3 = {"--batch": str(args.sd3_batch), "--steps": str(args.sd3_steps), "--latent": str(args.sd3_latent),
           "--optimizer": "sgd"}
    if not args.skip_sd3 and not args.skip_lora:
        report["sd3m_cpu"] = compare(arch("sd3m"), args, lora=True, full=False, **sd3)
    if not args.skip_sd3_reduced:
        report["sd3m_reduced_cpu"] = compare(arch("sd3m"), args, lora=True, **sd3,
                                             **{"--num-layers": str(args.sd3_layers)})
    if not args.skip_flux:
        report["flux_reduced_cpu"] = compare(arch("flux1"), args, lora=True, **{
            "--batch": str(args.flux_batch), "--steps": str(args.flux_steps), "--latent": str(args.flux_latent),
            "--optimizer": "sgd", "--num-layers": str(args.flux_layers),
            "--num-single-layers": str(args.flux_single_layers)})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
