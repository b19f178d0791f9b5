"""The digits demo, shortened, and `--model digits` in every command."""

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.core.errors import UserError
from amnesia_sd.data.generate import image_seed
from amnesia_sd.model import digits
from amnesia_sd.studies.demo import DemoConfig, format_table, demo

from helpers import unet_weights

KEYS = {"p_forgotten", "entropy_forgotten", "acc_retained", "p_forgotten_heldout"}
QUICK = ["--num-inference-steps", "2", "--batch-size", "16"]
# make_grid's layout (amnesia_sd/grid.py): 2-pixel gaps, a 14-pixel label strip on top when there are
# column labels, and images smaller than 64 pixels enlarged to 64 (nearest neighbour).
PAD, LABELS, CELL = 2, 14, max(digits.IMAGE_SIZE, 64)


pytestmark = pytest.mark.usefixtures("isolated_cache")  # the demo's Fisher and classifier go there


def grid_size(rows: int, cols: int, labels: bool) -> tuple[int, int]:
    return cols * (CELL + PAD) + PAD, (LABELS if labels else 0) + rows * (CELL + PAD) + PAD


def grid_cell(grid: Image.Image, row: int, col: int, labels: bool) -> Image.Image:
    x, y = PAD + col * (CELL + PAD), (LABELS if labels else 0) + PAD + row * (CELL + PAD)
    return grid.crop((x, y, x + CELL, y + CELL))


def enlarged(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST))


def demo_samples(model_dir, digit: int, n: int, steps: int, seed: int = 0) -> list[Image.Image]:
    """The demo's evaluation images made with plain diffusers: n per digit on its training phrasings
    (digit-major, image i seeded by (seed, i)), then n of `digit` on held-out phrasings (seeds
    (seed + 1, i)); DDIM, guidance 7.5, one batch."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    train = [digits.train_prompts(d)[i % len(digits.train_prompts(d))] for d in range(10) for i in range(n)]
    heldout = [digits.heldout_prompts(digit)[i % len(digits.heldout_prompts(digit))] for i in range(n)]
    seeds = [image_seed(seed, i) for i in range(10 * n)] + [image_seed(seed + 1, i) for i in range(n)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(train + heldout, num_inference_steps=steps, guidance_scale=7.5, generator=generators).images


def demo_numbers(probs: torch.Tensor, digit: int, n: int) -> dict:
    """The four numbers of metrics.json, computed here from the classifier's probabilities."""
    forgotten = probs[digit * n : (digit + 1) * n]
    retained = [(probs[d * n : (d + 1) * n].argmax(1) == d).float() for d in range(10) if d != digit]
    return {
        "p_forgotten": forgotten[:, digit].mean().item(),
        "entropy_forgotten": -(forgotten * forgotten.clamp_min(1e-12).log()).sum(1).mean().item(),
        "acc_retained": torch.cat(retained).mean().item(),
        "p_forgotten_heldout": probs[10 * n :, digit].mean().item(),
    }


def test_short_demo_writes_what_it_promises(tmp_path):
    out = tmp_path / "demo"
    # 4 samples per digit: the grid shows 4 per digit and model.
    config = DemoConfig(digit=3, output_dir=str(out), samples_per_digit=4, replay_per_digit=2, surrogate_images=4,
                        fim_per_digit=1, fim_timesteps=4, max_train_steps=2, train_batch_size=4,
                        num_inference_steps=3, batch_size=64)
    returned = demo(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert returned == metrics
    assert metrics["forgotten_digit"] == 3 and metrics["surrogate"] == "noise" and metrics["samples_per_digit"] == 4
    assert metrics["base_model_path"] == str(digits.SHIPPED_MODEL) and metrics["seconds"] > 0
    assert metrics["settings"] == asdict(config)

    # The two forgotten pipelines: complete, every component but the UNet the base's, and the
    # UNets differ from the base's and from each other.
    base = unet_weights(digits.SHIPPED_MODEL)
    unets = {name: unet_weights(out / name) for name in ("sa", "naive")}
    for name, unet in unets.items():
        assert unet.keys() == base.keys()
        assert any(not torch.equal(unet[k], base[k]) for k in base), f"{name}: UNet unchanged"
        for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            assert (out / name / part).read_bytes() == (digits.SHIPPED_MODEL / part).read_bytes(), (name, part)
    assert any(not torch.equal(unets["sa"][k], unets["naive"][k]) for k in base), "SA and naive gave the same UNet"

    # Both runs: the same data and steps; SA with the demo's lambda and gamma, naive with neither.
    records = {name: json.loads((out / name / "amnesia.json").read_text()) for name in ("sa", "naive")}
    for name, record in records.items():
        settings = record["settings"]
        assert record["steps"] == 2 and record["base_model"] == str(digits.SHIPPED_MODEL), name
        assert settings["max_train_steps"] == 2 and settings["train_batch_size"] == 4, name
        assert settings["learning_rate"] == config.learning_rate and settings["seed"] == 0, name
        assert record["concept_prompts"] == digits.train_prompts(3), name
        assert record["fim"]["metadata"]["num_samples"] == "10"  # 1 image per digit, all ten digits
        assert record["fim"]["metadata"]["num_timesteps"] == "4"
    assert (records["sa"]["settings"]["lambda_ewc"], records["sa"]["settings"]["gamma"]) == (
        DemoConfig.lambda_ewc, config.gamma) == (1e-4, 1.0)
    assert (records["naive"]["settings"]["lambda_ewc"], records["naive"]["settings"]["gamma"]) == (0, 0)
    # The same replay set and Fisher: 2 images of each digit but the forgotten one, then 2 (one per
    # ten) of the empty prompt; 4 noise images as the surrogate.
    replay = (out / "sa" / records["sa"]["replay_set"]).resolve()
    assert replay == (out / "naive" / records["naive"]["replay_set"]).resolve()
    assert records["sa"]["fim"]["path"] == records["naive"]["fim"]["path"]
    replay_prompts = (replay / "prompts.txt").read_text().split("\n")
    assert replay_prompts[:18] == [digits.train_prompts(d)[i] for d in range(10) if d != 3 for i in range(2)]
    assert replay_prompts[18:] == ["", ""] and records["sa"]["replay_images"] == {"prompted": 18, "unconditional": 2}
    assert len(list((replay / "images").glob("*.png"))) == 20
    for name, record in records.items():
        with safe_open(str(out / name / record["surrogate_set"] / "latents.safetensors"), "pt") as f:
            assert f.get_slice("latents").get_shape()[0] == 4, name

    # metrics.json holds what the three saved models actually draw: the same prompts and seeds,
    # sampled here with plain diffusers and scored with the classifier.
    classifier = digits.load_digit_classifier()
    samples = {}
    for name, folder in (("original", digits.SHIPPED_MODEL), ("sa", out / "sa"), ("naive", out / "naive")):
        samples[name] = demo_samples(folder, 3, 4, 3)
        expected = demo_numbers(digits.classify(samples[name], classifier), 3, 4)
        assert set(metrics[name]) == KEYS
        assert metrics[name] == pytest.approx(expected, abs=1e-5), name

    # grid.png: a row per digit, 4 samples each of original | SA | naive, the same images.
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.size == grid_size(10, 12, labels=True)
    for d in range(10):
        for m, name in enumerate(("original", "sa", "naive")):
            for k in range(4):
                cell = np.asarray(grid_cell(grid, d, 4 * m + k, labels=True))
                same = np.array_equal(cell, enlarged(samples[name][d * 4 + k]))
                assert same, f"grid row {d}, {name} sample {k} is not that image"

    before = (out / "metrics.json").read_bytes()
    with pytest.raises(UserError, match=re.escape(str(out)) + " already holds a finished demo; pass --overwrite"):
        demo(DemoConfig(output_dir=str(out)))
    assert (out / "metrics.json").read_bytes() == before


def test_short_lora_demo(tmp_path):
    """--lora-rank: SA and naive train adapters; metrics.json says how large the adapter is."""
    out = tmp_path / "demo"
    metrics = demo(DemoConfig(output_dir=str(out), samples_per_digit=2, replay_per_digit=2, surrogate_images=4,
                                  fim_per_digit=1, fim_timesteps=4, max_train_steps=2, train_batch_size=4,
                                  num_inference_steps=3, batch_size=64, lora_rank=2))
    assert metrics["settings"]["learning_rate"] == 5e-3 and set(metrics["sa"]) == KEYS
    for name in ("sa", "naive"):
        record = json.loads((out / name / "amnesia.json").read_text())
        assert record["lora"]["rank"] == 2 and record["settings"]["lora_targets"] == metrics["settings"]["lora_targets"]
        assert record["settings"]["lora_targets"] == "to_q,to_k,to_v,to_out.0,conv1,conv2"  # the UNet digits model
        assert not (out / name / "unet").exists()
    assert metrics["adapter_bytes"] == (out / "sa" / "pytorch_lora_weights.safetensors").stat().st_size
    assert "LoRA rank 2: the adapter is" in format_table(metrics)


def test_short_demo_of_the_sd3_digits_model(tmp_path):
    """--model digits-sd3: the same experiment on the SD3-shaped flow-matching model; only the
    transformer changes (full weights and LoRA, whose default targets are the attention layers
    alone: a transformer has no conv1/conv2); --attack, which trains xattn variants, is refused."""
    shipped = digits.SHIPPED_MODELS["sd3"]
    quick = dict(samples_per_digit=2, replay_per_digit=2, surrogate_images=4, fim_per_digit=1, fim_timesteps=4,
                 max_train_steps=2, train_batch_size=2, num_inference_steps=2, batch_size=64, model="digits-sd3")
    metrics = demo(DemoConfig(output_dir=str(tmp_path / "full"), **quick))
    assert metrics["base_model_path"] == str(shipped) and set(metrics["sa"]) == KEYS
    base = load_file(str(shipped / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name in ("sa", "naive"):
        moved = load_file(str(tmp_path / "full" / name / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert moved.keys() == base.keys() and any(not torch.equal(moved[k], base[k]) for k in base), name
        assert (tmp_path / "full" / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
            (shipped / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    lora = demo(DemoConfig(output_dir=str(tmp_path / "lora"), lora_rank=2, **quick))
    assert lora["settings"]["lora_targets"] == "to_q,to_k,to_v,to_out.0" and lora["adapter_bytes"] > 0
    with pytest.raises(UserError, match="--attack also trains --train-method xattn"):
        DemoConfig(model="digits-sd3", attack=True)
    with pytest.raises(UserError, match="model"):
        DemoConfig(model="digits-xl")


def test_every_command_takes_model_digits(tmp_path):
    from diffusers import StableDiffusionPipeline

    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(app, [*args])
        assert result.exit_code == 0, result.output

    ok("replay", "--model", "digits", "--output-dir", str(tmp_path / "r"), "--num-images", "2", *QUICK)
    ok("surrogate", "--model", "digits", "--prompt", "the number 8", "--output-dir", str(tmp_path / "s"),
       "--num-images", "2", *QUICK)
    ok("fim", "--model", "digits", "--replay-dir", str(tmp_path / "r"), "--output", str(tmp_path / "f.safetensors"),
       "--num-timesteps", "2")
    ok("forget", "--model", "digits", "--concept", "the number 3", "--no-templates", "--surrogate-dir",
       str(tmp_path / "s"), "--replay-dir", str(tmp_path / "r"), "--fim", str(tmp_path / "f.safetensors"),
       "--output-dir", str(tmp_path / "o"), "--max-train-steps", "1")
    ok("sample", "--model", "digits", "--prompt", "the number 3", "--num-images", "1", "--output-dir",
       str(tmp_path / "p"), "--compare", str(tmp_path / "o"), *QUICK)
    ok("eval", "--model", str(tmp_path / "o"), "--base", "digits", "--output-dir", str(tmp_path / "e"),
       "--num-images", "1", *QUICK)

    # replay and surrogate: finished sets of the digits model's 16x16 images and 4x8x8 latents.
    for name, count in (("r", None), ("s", 2)):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        images = sorted((tmp_path / name / "images").glob("*.png"))
        prompts = (tmp_path / name / "prompts.txt").read_text().split("\n")
        assert manifest["latent_shape"] == [4, 8, 8] and len(images) == len(prompts) == (count or len(images)) > 0
        assert {Image.open(p).size for p in images} == {(digits.IMAGE_SIZE, digits.IMAGE_SIZE)}
    assert set((tmp_path / "s" / "prompts.txt").read_text().split("\n")) == {"the number 8"}

    # fim: one non-negative tensor per parameter of the digits model's UNet.
    weights = unet_weights(digits.SHIPPED_MODEL)
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert set(f.keys()) == set(weights)
        assert f.metadata()["num_timesteps"] == "2"
        assert all((f.get_tensor(k) >= 0).all() and f.get_tensor(k).shape == weights[k].shape for k in weights)

    # forget: a pipeline that loads, with a new UNet, trained from the given sets.
    record = json.loads((tmp_path / "o" / "amnesia.json").read_text())
    assert record["base_model"] == str(digits.SHIPPED_MODEL) and record["steps"] == 1
    assert record["concept_prompts"] == ["the number 3"]
    assert record["surrogate_set"] == str((tmp_path / "s").resolve())
    assert record["replay_set"] == str((tmp_path / "r").resolve())
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "o")
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(trained[k], weights[k]) for k in weights)

    # sample: one image of the digits model and one of the forgotten model, and both grids.
    p = tmp_path / "p"
    assert [f.name for f in (p / "images").iterdir()] == ["p000_s000.png"]
    assert [f.name for f in (p / "base").iterdir()] == ["p000_s000.png"]
    for folder in ("images", "base"):
        assert Image.open(p / folder / "p000_s000.png").size == (digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    assert Image.open(p / "grid.png").size == grid_size(1, 1, labels=False)
    assert Image.open(p / "compare.png").size == grid_size(1, 2, labels=True)

    # eval: the demo's sets (1 image per digit) and the demo's four numbers for both models.
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["detector"] == "digits"
    assert report["digits"]["forgotten_digit"] == 3 and report["digits"]["samples_per_digit"] == 1
    for role in ("base", "forgotten"):
        assert set(report["digits"][role]) == KEYS
        assert 0 <= report["digits"][role]["p_forgotten"] <= 1
        assert 0 <= report["digits"][role]["acc_retained"] <= 1
    assert {name: s["num_images"] for name, s in report["sets"].items()} == {
        "concept": 1, "paraphrase": 1, "retained": 9}
    assert report["models"]["forgotten"]["unet_sha256"] != report["models"]["base"]["unet_sha256"]
    assert report["models"]["forgotten"]["amnesia"]["concepts"] == ["the number 3"]
    for s in report["sets"].values():
        for entry in s["images"]:
            for role in ("base", "forgotten"):
                assert Image.open(tmp_path / "e" / entry[role]["image"]).size == (digits.IMAGE_SIZE,) * 2
    assert (tmp_path / "e" / "report.html").is_file()


TINY_DEMO = dict(samples_per_digit=2, replay_per_digit=2, surrogate_images=4, fim_per_digit=1, fim_timesteps=4,
                 train_batch_size=4, num_inference_steps=2, batch_size=64)


@pytest.mark.parametrize("sequential", [False, True])
def test_demo_of_several_digits(tmp_path, sequential):
    out = tmp_path / "demo"
    config = DemoConfig(digit=[3, 5], sequential=sequential, sequential_fisher="recompute", output_dir=str(out),
                        **TINY_DEMO)
    assert config.max_train_steps == (400 if sequential else 800)  # 400 steps' worth per digit
    assert (config.gamma, config.lr_warmup_steps) == (1.0, 0)  # one run, or a sequence's first
    metrics = demo(DemoConfig(**{**asdict(config), "max_train_steps": 2}))
    assert metrics["forgotten_digits"] == [3, 5] and "forgotten_digit" not in metrics
    assert metrics["mode"] == ("sequential" if sequential else "one run")
    for name in ("original", "sa", "naive"):
        m = metrics[name]
        assert set(m) == KEYS | {"per_digit"} and set(m["per_digit"]) == {"3", "5"}
        for key in ("p_forgotten", "p_forgotten_heldout", "entropy_forgotten"):
            assert m[key] == pytest.approx((m["per_digit"]["3"][key] + m["per_digit"]["5"][key]) / 2)
    assert "  digit 5" in format_table(metrics)
    record = json.loads((out / "sa" / "amnesia.json").read_text())
    assert [p["concept_prompts"] for p in record["pairs"]] == [digits.train_prompts(3), digits.train_prompts(5)]
    replay_prompts = (out / "sa" / record["replay_set"] / "prompts.txt").read_text().split("\n")
    assert not set(replay_prompts) & set(digits.train_prompts(3) + digits.train_prompts(5))  # replay: the kept digits
    # the demo also replays the model's unconditional samples: one per ten prompted images
    assert replay_prompts.count("") == round(0.1 * 8 * TINY_DEMO["replay_per_digit"])
    if sequential:
        assert [p["earlier_run"] for p in record["pairs"]] == [True, False]
        assert [h["concepts"] for h in record["history"]] == [digits.train_prompts(3)]
        # the first run as one digit alone; the run on its result with more replay and a warm-up,
        # since it starts a fresh optimizer on a model that already forgot
        first = record["history"][0]["settings"]
        assert (first["gamma"], first["lr_warmup_steps"]) == (1.0, 0)
        assert (record["settings"]["gamma"], record["settings"]["lr_warmup_steps"]) == (3.0, 100)
        # recompute: the second run's Fisher and replay set were made by the model that forgot 3
        assert record["fim"]["metadata"]["base_model"] == record["base_model"]
        naive = json.loads((out / "naive" / "amnesia.json").read_text())
        assert naive["fim"]["metadata"]["base_model"] == str(digits.SHIPPED_MODEL)
        assert (naive["settings"]["gamma"], naive["settings"]["lr_warmup_steps"]) == (0, 100)
    else:
        assert "history" not in record and record["steps"] == 2


def test_demo_attack_study(tmp_path):
    out = tmp_path / "demo"
    config = DemoConfig(digit=[3], output_dir=str(out), max_train_steps=2, attack=True, attack_steps=[2, 1],
                        attack_images=2, adversarial_every=1, adversarial_steps=1,
                        **{**TINY_DEMO, "num_inference_steps": 4})  # 4 x 0.3: one step of partial denoising
    assert config.unconditional_replay == 0.0  # the study measures the paper's replay
    assert config.attack_initializers == ["number", "symbol"]  # never --adversarial's "digit"
    metrics = demo(config)
    study = metrics["attack"]
    names = ("original", "sa", "sa-xattn", "sa-adversarial", "sa-xattn-adversarial")
    assert list(study["models"]) == list(names) and study["steps"] == [1, 2] and study["digit"] == 3
    for name in names:
        m = study["models"][name]
        ti = m["ti"]
        rates = [v for word in ("number", "symbol") for v in ti["after"][word].values()]
        assert list(ti["after"]) == ["number", "symbol"] and all(list(v) == ["1", "2"] for v in ti["after"].values())
        assert ti["worst"] == max(rates) and ti["after"][ti["worst_at"]["initializer"]][str(ti["worst_at"]["steps"])] \
            == ti["worst"]
        # every kind from the first word's run; the worst across kinds is the model's
        first = json.loads((out / "attacks" / f"{name}-number" / "attack.json").read_text())
        assert list(first["methods"]) == ["ti", "denoise", "prompt"]
        assert m["denoise"]["worst"] == first["methods"]["denoise"]["after"]
        assert m["prompt"]["worst"] == first["methods"]["prompt"]["after"]
        assert m["prompt"]["prompt"] == first["methods"]["prompt"]["prompt"]
        assert m["worst_by_kind"] == {"ti": ti["worst"], "denoise": m["denoise"]["worst"],
                                      "prompt": m["prompt"]["worst"]}
        assert m["worst"] == max(m["worst_by_kind"].values()) == m["worst_by_kind"][m["worst_kind"]]
        assert first["models"]["forgotten"]["before"] == m["p_forgotten_plain"]
        assert first["settings"]["steps"] == 2 and first["settings"]["measure_steps"] == [1]
        second = json.loads((out / "attacks" / f"{name}-symbol" / "attack.json").read_text())
        assert list(second["methods"]) == ["ti"]
        # measured apart from what the adversarial models trained against
        if "adversarial" in name:
            assert first["independence"]["all_apart"] is True
            assert first["independence"]["trained_against"]["initializer"] == "digit"
    for name in names[1:]:  # every model is also measured as the demo measures SA
        assert set(metrics[name]) == KEYS
    record = json.loads((out / "sa-xattn-adversarial" / "amnesia.json").read_text())
    assert record["settings"]["train_method"] == "xattn" and len(record["adversarial"]["rounds"]) == 2
    assert record["adversarial"]["prompts"] == [t.format("<amnesia-adversary>") for t in digits.TRAIN_TEMPLATES]
    # the classifier's floor: its probability of the digit on the noise surrogate images
    assert 0 <= study["classifier_floor"] <= 1
    worst = {name: study["models"][name]["worst"] for name in names}
    assert study["targets"]["original_recovered"] == (worst["original"] >= 0.9)
    plain, adv = (study["models"][name]["ti"]["worst"] for name in ("sa", "sa-adversarial"))
    assert study["targets"]["sa-adversarial_halves_sa_ti"] == (plain <= 0.1 or adv <= plain / 2)
    assert study["targets"]["sa_worst_below_0.1"] == (worst["sa"] < 0.1)
    for kind, (p, a) in study["adversarial_raised"]["sa-adversarial"].items():
        assert a > p and study["models"]["sa"]["worst_by_kind"][kind] == p
    table = format_table(metrics)
    assert "sa-xattn-adversarial" in table and "classifier floor" in table and "denoise" in table


@pytest.mark.slow
def test_demo_attack_meets_the_issue_targets(tmp_path):
    """`amnesia-sd demo --attack` at its defaults (digit 0; about 50 minutes on 2 CPU cores): every
    attack kind brings the digit back on the original model, SA's worst case across kinds stays below
    0.10, and wherever textual inversion lifts a plain SA model above 0.10, adversarial SA at most
    halves that, keeping acc_retained within 3 points."""
    metrics = demo(DemoConfig(digit=[0], attack=True, output_dir=str(tmp_path / "demo")))
    study = metrics["attack"]
    assert study["models"]["original"]["worst"] >= 0.9
    assert all(study["targets"].values()), study["targets"]
