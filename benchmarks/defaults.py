"""How cheap can the Fisher and the replay set be before forgetting suffers? (issue 11)

On the built-in digits model, the demo's experiment (forget digit 0 into uniform noise with Selective
Amnesia) is run with Fishers of decreasing cost: samples (all of the Fisher set, 1/4, 1/16) x
timesteps (1000, 250, 50, 10), and with replay sets of decreasing size. Each setting reports the
demo's four numbers, the Fisher's Spearman rank correlation and scale (sum ratio) against the exact
one (all samples, all 1000 timesteps), and its cost in UNet passes. The run-to-run noise of the exact
setting is measured with several training seeds. Prints one JSON object (and writes it to --out).

    python benchmarks/defaults.py [--samples-per-digit 30] [--seeds 3] [--out defaults.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from amnesia_sd.commands.forget import forget
from amnesia_sd.core.config import ForgetConfig, GenerationSettings
from amnesia_sd.data.digit_measures import evaluation_samples, per_digit_prompts, summarize
from amnesia_sd.data.imageset import generate_image_set
from amnesia_sd.method.fisher import fisher_diagonal, fisher_metadata, save_fisher, timestep_set
from amnesia_sd.model import digits
from amnesia_sd.model.families import FAMILIES
from amnesia_sd.model.loading import load_on_device, make_accelerator
from amnesia_sd.studies.demo import DemoConfig, noise_images, sample_and_classify

FRACTIONS = (1, 4, 16)
TIMESTEPS = (1000, 250, 50, 10)
REPLAY_PER_DIGIT = (50, 12, 3)  # the demo's 50, then about 1/4 and 1/16


def flat(path: Path) -> torch.Tensor:
    return torch.cat([v.flatten() for _, v in sorted(load_file(str(path)).items())])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def fishers(pipe, scheduler, fim_set, counts: list[int], steps: int, seed: int) -> dict[int, dict]:
    """Fishers over the first n samples for every n in `counts`, in one pass over the samples:
    each is the running sum of squared per-sample gradients divided by its own n."""
    timesteps = timestep_set(scheduler.config.num_train_timesteps, steps)
    family = FAMILIES["sd"]  # the digits model is a Stable Diffusion 1.x pipeline
    embed = lambda n: family.encode_text(pipe, [fim_set.prompts[n]])  # noqa: E731
    total, start, result = None, 0, {}
    for n in sorted(counts):
        part = fisher_diagonal(family, pipe.unet, scheduler, fim_set.latents[:n], embed, timesteps, seed, 100,
                               list(range(start, n)), progress=False)
        part = {k: v * n for k, v in part.items()}  # fisher_diagonal divides by n: back to a sum
        total = part if total is None else {k: total[k] + part[k] for k in total}
        result[n] = {k: v / n for k, v in total.items()}
        start = n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-digit", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the exact setting (noise)")
    parser.add_argument("--out", default="defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    demo = DemoConfig()
    base = digits.ensure_digits_model()
    accelerator = make_accelerator()
    ref, pipe = load_on_device(str(base), accelerator)
    pipe.text_encoder.requires_grad_(False)
    settings = GenerationSettings(num_inference_steps=demo.num_inference_steps, guidance_scale=demo.guidance_scale,
                                  seed=0, batch_size=demo.batch_size)
    work = Path(tempfile.mkdtemp(prefix="amnesia-defaults-"))
    cache = digits.cache_dir() / "demo"
    fim_set = generate_image_set(pipe, ref, per_digit_prompts(digits.train_prompts, demo.fim_per_digit, range(10)),
                                 settings, cache / "defaults-fim-set", "replay", accelerator, reuse=True)
    everything_else = [d for d in range(10) if d != demo.digit]
    replays = {r: generate_image_set(pipe, ref, per_digit_prompts(digits.train_prompts, r, everything_else), settings,
                                     cache / f"defaults-replay-{r}", "replay", accelerator, reuse=True)
               for r in REPLAY_PER_DIGIT}
    noise = noise_images(cache / f"noise-{demo.surrogate_images}-s0", demo.surrogate_images, digits.IMAGE_SIZE, 0)

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n_all = len(fim_set.latents)
    counts = sorted({max(1, n_all // f) for f in FRACTIONS})
    files, costs = {}, {}
    for steps in TIMESTEPS:
        t0 = time.time()
        for n, fisher in fishers(pipe, scheduler, fim_set, counts, steps, 0).items():
            name = f"n{n}-t{steps}"
            files[name] = work / f"fim-{name}.safetensors"
            meta = fisher_metadata(pipe, scheduler, ref.identity, n, timestep_set(1000, steps), 0,
                                   str(fim_set.path))
            save_fisher(files[name], fisher, "fp32", meta)
            costs[name] = n * steps
        print(f"Fishers at {steps} timesteps: {time.time() - t0:.0f} s", flush=True)
    exact_name = f"n{n_all}-t1000"
    exact = flat(files[exact_name])

    prompts, seeds = evaluation_samples(demo.digit, args.samples_per_digit, 0)
    classifier = digits.load_digit_classifier()

    def measure(name: str, fim: Path, replay, seed: int = 0) -> dict:
        out = work / f"sa-{name}-s{seed}"
        forget(ForgetConfig(model=str(base), output_dir=str(out), templates=False,
                            concept=", ".join(digits.train_prompts(demo.digit)),
                            fim=str(fim), replay_dir=str(replay.path), surrogate_images=str(noise),
                            train_batch_size=demo.train_batch_size, max_train_steps=demo.max_train_steps,
                            learning_rate=demo.learning_rate, lambda_ewc=demo.lambda_ewc, gamma=demo.gamma,
                            seed=seed, checkpointing_steps=demo.max_train_steps))
        _, probs = sample_and_classify(str(out), prompts, seeds, settings, accelerator, classifier)
        n = args.samples_per_digit
        return summarize(probs[: 10 * n], probs[10 * n :], demo.digit, n)

    results = {"model": str(base), "forgotten_digit": demo.digit, "samples_per_digit": args.samples_per_digit,
               "fisher_set_images": n_all, "fishers": {}, "replay": {}, "noise": []}
    _, probs = sample_and_classify(str(base), prompts, seeds, settings, accelerator, classifier)
    n = args.samples_per_digit
    results["original"] = summarize(probs[: 10 * n], probs[10 * n :], demo.digit, n)
    demo_replay = replays[REPLAY_PER_DIGIT[0]]
    for seed in range(args.seeds):
        results["noise"].append(measure(exact_name, files[exact_name], demo_replay, seed))
        print("exact, seed", seed, results["noise"][-1], flush=True)
    for name, path in files.items():
        variant = flat(path)
        entry = {"cost_passes": costs[name], "cost_fraction": costs[name] / costs[exact_name],
                 "spearman_vs_exact": spearman(variant, exact),
                 "scale_vs_exact": float(variant.sum() / exact.sum())}
        entry.update(results["noise"][0] if name == exact_name else measure(name, path, demo_replay))
        results["fishers"][name] = entry
        print(name, entry, flush=True)
    for r, replay in replays.items():
        if r == REPLAY_PER_DIGIT[0]:
            continue
        results["replay"][r * 9] = measure(f"replay{r}", files[f"n{max(1, n_all // 4)}-t50"], replay)
        print("replay", r * 9, results["replay"][r * 9], flush=True)
    results["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
