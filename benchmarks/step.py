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

LoRA (the digits and sd14_cpu rows, under their key "lora"; --skip-lora leaves it out): rank
--lora-rank (8) adapters on the library's default targets (to_q,to_k,to_v,to_out.0), alpha = rank,
fp32 base, adapters and Fisher, the row's optimizer; the penalty is amnesia_sd.model.ewc.LoraPenalty
(EWC on delta W = s B A, the frozen base weight being the anchor), built by the library's own
LoraAdapters with a random Fisher. Two more worker processes:

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

from unets import SD14_UNET, SDXL_UNET, random_conditioning, sd_scheduler  # noqa: E402

ARCHITECTURES = {"sd14": ("sd", SD14_UNET), "sdxl": ("sdxl", SDXL_UNET)}


def build_unet(model: str):
    """(family, unet, scheduler, tokens): an architecture with random weights, or a model's UNet."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from amnesia_sd.model.families import FAMILIES, family_of

    if model in ARCHITECTURES:
        family, config = ARCHITECTURES[model]
        torch.manual_seed(0)
        return FAMILIES[family], UNet2DConditionModel(**config), sd_scheduler(), 77
    from amnesia_sd.model.loading import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(model))
    return family_of(pipe), pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), pipe.tokenizer.model_max_length


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
    return LoraAdapters(unet, config, lambda names: {n: torch.rand(shapes[n], generator=generator) for n in names},
                        "cpu")


def worker(args) -> dict:
    """Run warm-up + timed steps of one variant; report seconds per step and peak RSS."""
    from amnesia_sd.model.diffusion import per_sample_loss
    from amnesia_sd.model.ewc import EWCPenalty
    from amnesia_sd.commands.forget import LOG_EVERY
    from amnesia_sd.model.loading import DTYPES
    from amnesia_sd.model.trainable import trainable_names

    torch.set_num_threads(args.threads)
    family, unet, scheduler, tokens = build_unet(args.model)
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
    size = args.latent or unet.config.sample_size
    b = args.batch
    # The same 2b batch for every variant: for SA, b surrogate + b replay images; the plain LoRA
    # step takes the first b (surrogate only).
    latents = torch.randn((2 * b, 4, size, size), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    cond = random_conditioning(dict(unet.config), 2 * b, g, image_size=8 * size, tokens=tokens)
    timesteps = torch.randint(0, 1000, (2 * b,), generator=g)
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


def compare(model, args, lora=False, **extra) -> dict:
    plain = run_variant(model, "plain", args, **extra)
    # Memory is counted against the bytes of the parameters that train (all of them but in the
    # sdxl row): the key names say which when only part of the UNet trains.
    partial = plain["trainable_parameters"] != plain["unet_parameters"]
    basis = "trained_param_bytes" if partial else "param_bytes"
    result, full_sa = {}, None
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
    return {
        "rank": args.lora_rank,
        "trainable_parameters": sa["trainable_parameters"],
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
        "full_sa_peak_rss_gb": round(full_sa["max_rss_bytes"] / 1e9, 2),
        "lora_peak_over_full_sa_peak": round(sa["max_rss_bytes"] / full_sa["max_rss_bytes"], 3),
        "lora_time_over_full_sa_time": round(seconds / full_sa["sa_seconds_per_step"], 3),
        "lora_penalty_state_bytes": sa["penalty_state_bytes"],  # F of the adapted weights (fp32); no theta*
        "targets": {"lora_peak_over_full_sa_peak": "<= 0.5 (sd14_cpu)", "lora_time_ratio": "<= 1.15"},
    }


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
    parser.add_argument("--skip-lora", action="store_true", help="no LoRA rows (digits and sd14_cpu)")
    parser.add_argument("--lora-rank", type=int, default=8, help="the LoRA rows' adapter rank")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = {"benchmark": "step", "threads": args.threads}
    if not args.skip_model:
        report.update(model=args.model, **compare(args.model, args, lora=True, **{
            "--batch": str(args.batch), "--steps": str(args.steps), "--train-method": args.train_method}))
    # AdamW's state for 860M parameters does not fit beside the Fisher in 24 GiB: plain SGD in the
    # architecture rows, the same optimizer for both variants.
    if not args.skip_sd14:
        report["sd14_cpu"] = compare("sd14", args, lora=True, **{
            "--batch": str(args.sd14_batch), "--steps": str(args.sd14_steps), "--latent": str(args.sd14_latent),
            "--optimizer": "sgd"})
    if not args.skip_sdxl:
        # Cross-attention only: the whole 2.57B-parameter UNet's weights, gradients, F and theta*
        # do not fit in 24 GiB (the docstring).
        report["sdxl_cpu"] = compare("sdxl", args, **{"--batch": str(args.sdxl_batch), "--steps": str(args.sdxl_steps),
                                                      "--latent": str(args.sdxl_latent), "--optimizer": "sgd",
                                                      "--train-method": "xattn"})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
