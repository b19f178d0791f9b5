"""`amnesia-sd demo --attack`: how deep the digits model's forgetting is, under every attack kind.

Every model of the demo (the original, SA with --train-method full and xattn, each plain and
--adversarial) is attacked with `amnesia-sd attack`: all three kinds (textual inversion, partial
denoising, prompt search) from the first initial word, and textual inversion again from each other
word, for the longest attack length; the shorter lengths are that run's token as it was then
(--measure-steps). Per model the worst case of each kind, and across kinds, is what counts. The
attack's defaults are apart from what --adversarial trained against (initial words, templates, seed
streams, concept images). The classifier's floor (its mean probability of the digit on the
surrogate's own images) tells "forgotten" from the judge's noise.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from amnesia_sd.commands.attack import AttackConfig, attack
from amnesia_sd.model import digits

# The study's pairs: a plain SA model, and the same training with --adversarial.
PAIRS = {"sa": "sa-adversarial", "sa-xattn": "sa-xattn-adversarial"}
ATTACKED = ("original", *PAIRS, *PAIRS.values())
RECOVERED = 0.9  # the attack must bring the digit back on the original model at least this often
LIFTED = 0.10  # where a plain SA model's worst ti case is above this, adversarial SA must at least halve it
RETAINED_POINTS = 0.03
RECOMMENDED = "sa"  # the model the README recommends: its worst case across kinds must stay below BOUND
BOUND = 0.10


def classifier_floor(surrogate_dir: Path, digit: int, classifier) -> float:
    """The classifier's mean probability of `digit` on the surrogate images themselves."""
    paths = sorted(p for p in surrogate_dir.rglob("*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    return digits.classify(images, classifier)[:, digit].mean().item()


def attack_model(config, name: str, spec: str, base: str, digit: int, folder: Path) -> dict:
    """Attack one model with every kind (textual inversion from every initial word); its plain rate,
    each kind's worst rate and where it was found, and the worst across kinds."""
    steps = config.attack_steps  # sorted, distinct (DemoConfig)
    ti, before, others = {}, None, {}
    for k, word in enumerate(config.attack_initializers):
        result = attack(AttackConfig(
            model=spec, base=base, concept=", ".join(digits.train_prompts(digit)),
            output_dir=str(folder / f"{name}-{word}"), method=["all"] if k == 0 else ["ti"], steps=steps[-1],
            measure_steps=steps[:-1], num_images=config.attack_images, initializer=word, seed=config.seed,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            batch_size=config.batch_size))
        before = result["models"]["forgotten"]["before"]  # the same images for every word (same seeds)
        ti[word] = result["methods"]["ti"]["after_by_steps"]
        if k == 0:
            others = {m: result["methods"][m] for m in ("denoise", "prompt")}
    worst_word, worst_steps = max(((w, s) for w in ti for s in ti[w]), key=lambda ws: ti[ws[0]][ws[1]])
    kinds = {"ti": ti[worst_word][worst_steps], "denoise": others["denoise"]["after"],
             "prompt": others["prompt"]["after"]}
    worst_kind = max(kinds, key=kinds.get)
    return {"p_forgotten_plain": before,
            "ti": {"after": ti, "worst": kinds["ti"], "worst_at": {"initializer": worst_word, "steps": int(worst_steps)}},
            "denoise": {"after_by_strength": others["denoise"]["after_by_strength"], "worst": kinds["denoise"],
                        "worst_at": {"strength": others["denoise"]["worst_strength"]}},
            "prompt": {"prompt": others["prompt"]["prompt"], "worst": kinds["prompt"]},
            "worst_by_kind": kinds, "worst": kinds[worst_kind], "worst_kind": worst_kind}


def attack_study(config, base: str, models: dict[str, str], metrics: dict, surrogate_dir: Path, folder: Path,
                 classifier) -> dict:
    """The study's numbers (metrics.json "attack"); each attack's own result stays in `folder`."""
    [digit] = config.digit
    attacked = {name: attack_model(config, name, models[name], base, digit, folder) for name in ATTACKED}
    original_acc = metrics["original"]["acc_retained"]
    targets = {"original_recovered": attacked["original"]["worst"] >= RECOVERED}
    for plain, adversarial in PAIRS.items():
        # What --adversarial trains against: textual inversion. Across kinds it may do worse
        # (adversarial_raised), which the study reports rather than hides in a target.
        ti = {name: attacked[name]["ti"]["worst"] for name in (plain, adversarial)}
        targets[f"{adversarial}_halves_{plain}_ti"] = ti[plain] <= LIFTED or ti[adversarial] <= ti[plain] / 2
        targets[f"{adversarial}_acc_retained"] = metrics[adversarial]["acc_retained"] >= original_acc - RETAINED_POINTS
    targets[f"{RECOMMENDED}_worst_below_{BOUND:g}"] = attacked[RECOMMENDED]["worst"] < BOUND
    # Where adversarial training (against textual inversion) made another kind of attack stronger.
    raised = {adversarial: {k: [attacked[plain]["worst_by_kind"][k], v]
                            for k, v in attacked[adversarial]["worst_by_kind"].items()
                            if v > attacked[plain]["worst_by_kind"][k]}
              for plain, adversarial in PAIRS.items()}
    return {
        "steps": config.attack_steps, "initializers": list(config.attack_initializers),
        "images_per_attack": config.attack_images, "digit": digit,
        "classifier_floor": classifier_floor(surrogate_dir, digit, classifier),
        "models": attacked, "targets": targets, "results": str(folder.name),
        "adversarial_raised": raised,  # per adversarial model, kind: [plain model's worst, adversarial's]
        "rules": {"recovered": RECOVERED, "lifted": LIFTED, "retained_points": RETAINED_POINTS,
                  "recommended": RECOMMENDED, "bound": BOUND},
    }


def format_study(study: dict) -> str:
    """The study as a few lines for the terminal."""
    lines = [f"attack ({study['images_per_attack']} held-out images each; p_forgotten before -> worst after, per kind: "
             f"textual inversion {'/'.join(map(str, study['steps']))} steps from {', '.join(study['initializers'])}, "
             f"partial denoising, prompt search); classifier floor {study['classifier_floor']:.3f}"]
    for name, m in study["models"].items():
        kinds = "  ".join(f"{k} {v:.3f}" for k, v in m["worst_by_kind"].items())
        lines.append(f"  {name:<22} {m['p_forgotten_plain']:.3f} -> {m['worst']:.3f} ({m['worst_kind']})   {kinds}")
    lines.append("  targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in study["targets"].items()))
    return "\n".join(lines)
