"""`amnesia-sd demo --attack`: how deep the digits model's forgetting is.

Every model of the demo (the original, SA with --train-method full and xattn, each plain and
--adversarial) is attacked with `amnesia-sd attack` from each initial word, for the longest attack
length; the shorter lengths are that run's token as it was then (--measure-steps). The worst case
over lengths and words is what counts. The classifier's floor (its mean probability of the digit on
the surrogate's own images) tells "forgotten" from the judge's noise.
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
LIFTED = 0.10  # where a plain SA model's worst case is above this, adversarial SA must at least halve it
RETAINED_POINTS = 0.03


def classifier_floor(surrogate_dir: Path, digit: int, classifier) -> float:
    """The classifier's mean probability of `digit` on the surrogate images themselves."""
    paths = sorted(p for p in surrogate_dir.rglob("*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    return digits.classify(images, classifier)[:, digit].mean().item()


def attack_model(config, name: str, spec: str, base: str, digit: int, folder: Path) -> dict:
    """Attack one model from every initial word; its plain rate, every post-attack rate, the worst."""
    steps = config.attack_steps  # sorted, distinct (DemoConfig)
    after, before = {}, None
    for word in config.attack_initializers:
        result = attack(AttackConfig(
            model=spec, base=base, concept=", ".join(digits.train_prompts(digit)),
            output_dir=str(folder / f"{name}-{word}"), steps=steps[-1], measure_steps=steps[:-1],
            num_images=config.attack_images, initializer=word, seed=config.seed,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            batch_size=config.batch_size))
        before = result["models"]["forgotten"]["before"]  # the same images for every word (same seeds)
        after[word] = result["models"]["forgotten"]["after_by_steps"]
    worst_word, worst_steps = max(((w, s) for w in after for s in after[w]), key=lambda ws: after[ws[0]][ws[1]])
    return {"p_forgotten_plain": before, "after": after, "worst": after[worst_word][worst_steps],
            "worst_at": {"initializer": worst_word, "steps": int(worst_steps)}}


def attack_study(config, base: str, models: dict[str, str], metrics: dict, surrogate_dir: Path, folder: Path,
                 classifier) -> dict:
    """The study's numbers (metrics.json "attack"); each attack's own result stays in `folder`."""
    [digit] = config.digit
    attacked = {name: attack_model(config, name, models[name], base, digit, folder) for name in ATTACKED}
    original_acc = metrics["original"]["acc_retained"]
    targets = {"original_recovered": attacked["original"]["worst"] >= RECOVERED}
    for plain, adversarial in PAIRS.items():
        lifted = attacked[plain]["worst"] > LIFTED
        targets[f"{adversarial}_halves_{plain}"] = (not lifted) or attacked[adversarial]["worst"] <= \
            attacked[plain]["worst"] / 2
        targets[f"{adversarial}_acc_retained"] = metrics[adversarial]["acc_retained"] >= original_acc - RETAINED_POINTS
    return {
        "steps": config.attack_steps, "initializers": list(config.attack_initializers),
        "images_per_attack": config.attack_images, "digit": digit,
        "classifier_floor": classifier_floor(surrogate_dir, digit, classifier),
        "models": attacked, "targets": targets, "results": str(folder.name),
        "rules": {"recovered": RECOVERED, "lifted": LIFTED, "retained_points": RETAINED_POINTS},
    }


def format_study(study: dict) -> str:
    """The study as a few lines for the terminal."""
    lines = [f"attack (textual inversion, {'/'.join(map(str, study['steps']))} steps, initial words "
             f"{', '.join(study['initializers'])}; {study['images_per_attack']} held-out images each): "
             f"p_forgotten before -> worst after; classifier floor {study['classifier_floor']:.3f}"]
    for name, m in study["models"].items():
        lines.append(f"  {name:<22} {m['p_forgotten_plain']:.3f} -> {m['worst']:.3f} "
                     f"({m['worst_at']['initializer']}, {m['worst_at']['steps']} steps)")
    lines.append("  targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in study["targets"].items()))
    return "\n".join(lines)
