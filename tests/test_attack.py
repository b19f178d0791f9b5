"""`amnesia-sd attack`: three kinds of attack (textual inversion, partial denoising, prompt search); only
the token trains, each kind replays in plain diffusers, the defaults stay apart from forget
--adversarial's, bad input is refused."""

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from PIL import Image
from safetensors.torch import load_file

from amnesia_sd.commands.attack import TOKEN, AttackConfig, attack, format_summary
from amnesia_sd.data.imageset import ImageSet
from amnesia_sd.data.prompts import bundled, read_prompts
from amnesia_sd.method.prompt_search import vocabulary
from amnesia_sd.method.textual_inversion import add_token, learn_token
from amnesia_sd.model import digits
from amnesia_sd.model.families import family_of

from helpers import load_parts, random_latents
from test_careless import refuses
from test_eval import perturbed_copy, tiny_clip  # noqa: F401 (tiny_clip: a fixture)

pytestmark = pytest.mark.usefixtures("isolated_cache")  # the digit classifier is trained into it


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def test_only_the_token_embedding_trains(tiny_model):
    pipe, scheduler = load_parts(tiny_model)
    pipe.unet.requires_grad_(True)  # as in forget --adversarial: a UNet being trained gets no gradient
    before = weights(pipe)
    [embedding_key] = [k for k in before if k.startswith("text_encoder.") and k.endswith("token_embedding.weight")]
    man = pipe.tokenizer.encode("man", add_special_tokens=False)[0]
    [token_id] = add_token(pipe, family_of(pipe), TOKEN, "man")
    assert token_id == len(before[embedding_key])  # one new row at the end
    images = ImageSet(Path("unused"), ["x"] * 4, random_latents(4), {}, {})
    [row], losses, kept = learn_token(family_of(pipe), pipe, pipe.unet, scheduler, [token_id], images,
                                    [f"a photo of {TOKEN}"], steps=3, learning_rate=1e-2, batch_size=2, seed=0,
                                    keep_at=(2,))
    assert all(p.grad is None for p in pipe.unet.parameters())
    after = weights(pipe)
    assert set(after) == set(before)
    changed = [k for k in before if k != embedding_key and not torch.equal(before[k], after[k])]
    assert changed == []
    table = after[embedding_key]
    assert table.shape == (len(before[embedding_key]) + 1, before[embedding_key].shape[1])
    assert torch.equal(table[:-1], before[embedding_key])  # every old row, byte for byte
    assert torch.equal(table[-1], row) and not torch.equal(row, before[embedding_key][man])  # the new one trained
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert list(kept) == [2] and not torch.equal(kept[2][0], row)  # the row after step 2 of 3
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_fp16_token_learns_with_loss_scaling_where_unscaled_fp16_learns_nothing(tiny_model):
    """The UNet's backward in fp16 at SD's size (emulated as in test_fisher): unscaled, the token's
    gradient flushes to zero and it does not move; with the GradScaler it moves as in fp32."""
    from test_fisher import fp16_gradients

    moved = {}
    for name, shrink, fp16 in (("fp32", None, False), ("unscaled", 1e-5, False), ("scaled", 1e-5, True)):
        pipe, scheduler = load_parts(tiny_model)
        [token_id] = add_token(pipe, family_of(pipe), TOKEN, "man")
        start = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().clone()
        handles = fp16_gradients(pipe.unet, shrink) if shrink else []
        images = ImageSet(Path("unused"), ["x"] * 4, random_latents(4), {}, {})
        [row], _, _ = learn_token(family_of(pipe), pipe, pipe.unet, scheduler, [token_id], images,
                                  [f"a photo of {TOKEN}"], steps=3, learning_rate=1e-2, batch_size=2, seed=0, fp16=fp16)
        for handle in handles:
            handle.remove()
        moved[name] = row - start
    assert moved["fp32"].abs().min() > 0
    assert torch.equal(moved["unscaled"], torch.zeros_like(moved["unscaled"]))  # measured: all 32 elements
    assert (moved["scaled"] - moved["fp32"]).norm() <= 1e-2 * moved["fp32"].norm()  # measured: 2e-4


@pytest.fixture(scope="module")
def forgotten_digits(tmp_path_factory):
    return perturbed_copy(digits.SHIPPED_MODEL, tmp_path_factory.mktemp("digits") / "sa", {
        "base_model": str(digits.SHIPPED_MODEL), "concepts": digits.train_prompts(3), "surrogate": "noise"})


def plain_diffusers_images(model: Path, embeddings: Path, prompts: list[str], seeds: list[int], batch: int,
                           steps: int, size: int) -> list[Image.Image]:
    """What a user gets with diffusers alone: the pipeline, DDIM, load_textual_inversion."""
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(str(embeddings), token=TOKEN)
    images = []
    for start in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch]]
        images += pipe(prompts[start : start + batch], num_inference_steps=steps, guidance_scale=7.5,
                       generator=generators, height=size, width=size).images
    return images


def img2img_images(model: Path, inputs: list[Path], prompts: list[str], seeds: list[int], strength: float,
                   batch: int, steps: int) -> list[Image.Image]:
    """What a user gets with StableDiffusionImg2ImgPipeline alone, on the attack's inputs and seeds."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = []
    for start in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch]]
        images += pipe(prompts[start : start + batch], image=[Image.open(p) for p in inputs[start : start + batch]],
                       strength=strength, num_inference_steps=steps, guidance_scale=7.5, generator=generators).images
    return images


def test_digits_attack_end_to_end(forgotten_digits, tmp_path):
    models = {"base": digits.SHIPPED_MODEL, "forgotten": forgotten_digits}
    hashes = {role: folder_hashes(path) for role, path in models.items()}
    out = tmp_path / "attack"
    n, batch, steps = 3, 2, 2
    result = attack(AttackConfig(model=str(forgotten_digits), output_dir=str(out), steps=4, num_images=n,
                                 train_batch_size=2, num_inference_steps=steps, batch_size=batch,
                                 measure_steps=[2], strength=[1.0, 0.5], prompt_words=2, prompt_steps=3))
    assert result == json.loads((out / "attack.json").read_text())
    assert {role: folder_hashes(path) for role, path in models.items()} == hashes  # inputs untouched

    assert result["tool"] == "amnesia-sd" and result["command"] == "attack"
    assert result["detector"] == "digits" and result["rate"] == "p_forgotten"
    assert result["concepts"] == digits.train_prompts(3) and result["digit"] == 3
    s = result["settings"]
    assert (s["steps"], s["num_images"], s["learning_rate"], s["train_batch_size"], s["seed"], s["batch_size"],
            s["num_inference_steps"], s["image_size"], s["method"], s["strength"]) == \
        (4, n, 5e-3, 2, 0, batch, steps, 16, ["ti", "denoise", "prompt"], [0.5, 1.0])
    methods = result["methods"]
    assert list(methods) == ["ti", "denoise", "prompt"]
    before = result["models"]["forgotten"]["before"]
    for kind, m in methods.items():
        assert m["before"] == before and m["base"]["before"] == result["models"]["base"]["before"]
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in (m["before"], m["after"], *m["base"].values()))
    worst = max(methods, key=lambda k: methods[k]["after"])
    assert result["worst"] == {"method": worst, "before": before, "after": methods[worst]["after"]}
    assert result["attack_success"] == methods[worst]["after"]
    assert result["models"]["base"]["identity"] == str(digits.SHIPPED_MODEL)

    # textual inversion: the token, from a word that is not --adversarial's, on the attack's templates
    ti = methods["ti"]
    assert ti["token"] == TOKEN and ti["initializer"] == "number" and ti["initializer"] not in ("object", "digit")
    by_steps = ti["after_by_steps"]  # the token after 2 of its 4 steps, and after 4
    assert list(by_steps) == ["2", "4"] and by_steps["4"] == ti["after"] and 0 <= by_steps["2"] <= 1
    assert len(list((out / "images" / "forgotten" / "token-at-2").glob("*.png"))) == n
    t = ti["training"]
    assert t["steps"] == len(t["losses"]) == 4 and all(math.isfinite(v) and v >= 0 for v in t["losses"])
    assert ti["training_prompts"] == [p.format(TOKEN) for p in digits.ATTACK_TEMPLATES]
    assert not set(digits.ATTACK_TEMPLATES) & set(digits.TRAIN_TEMPLATES + digits.HELDOUT_TEMPLATES)
    # partial denoising: every strength, the worst one counts
    d = methods["denoise"]
    assert d["strengths"] == [0.5, 1.0] and list(d["after_by_strength"]) == ["0.5", "1"]
    assert d["after"] == max(d["after_by_strength"].values()) == d["after_by_strength"][f"{d['worst_strength']:g}"]
    # the prompt search: real words before the concept's phrasing, nothing to load
    p = methods["prompt"]
    words = p["prompt"].split()
    assert len(words) == 2 and all(w in digits.CONTEXT_WORDS or w in digits.DIGIT_WORDS or w.isalpha() for w in words)
    assert p["example"].startswith(p["prompt"] + " ") and len(p["checks"]) >= 1 and len(p["losses"]) == 3
    assert p["held_back_loss"] == min(loss for _, loss in p["checks"])  # the best words found are kept

    assert result["concept_set"] == {"path": "concept-set", "source": "generated", "num_images": n}
    assert len(list((out / "concept-set" / "images").iterdir())) == n
    manifest = json.loads((out / "concept-set" / "manifest.json").read_text())
    assert manifest["seed_stream"] == "attack-concept"  # not the images forget --adversarial drew
    assert result["independence"]["trained_against"] is None
    assert isinstance(result["seconds"], float) and result["seconds"] > 0

    # Held-out phrasings, the same seed for every kind; per image the classifier's numbers.
    heldout = set(digits.heldout_prompts(3))
    kinds = ["plain", "prompt", "token", "token-at-2", "denoise-0.5", "denoise-1"]
    for entry in result["images"]:
        assert sorted(k for k in entry if isinstance(entry[k], dict)) == sorted(kinds)
        assert entry["plain"]["prompt"] in heldout and TOKEN in entry["token"]["prompt"]
        assert entry["token"]["prompt"].replace(TOKEN, "three") in heldout
        assert entry["prompt"]["prompt"] == f"{p['prompt']} {entry['plain']['prompt']}"
        assert entry["denoise-0.5"]["prompt"] == entry["plain"]["prompt"]
        for kind in kinds:
            for role in ("base", "forgotten") if kind != "token-at-2" else ("forgotten",):
                assert (out / entry[kind][role]["image"]).is_file()
                assert 0 <= entry[kind][role]["digits"]["p_forgotten"] <= 1

    # Every kind replays in plain diffusers: the token file with load_textual_inversion, the prompt as
    # text, the partial denoising with StableDiffusionImg2ImgPipeline on the concept images.
    embeds = load_file(out / "learned_embeds.safetensors")
    width = json.loads((forgotten_digits / "text_encoder" / "config.json").read_text())["hidden_size"]
    assert list(embeds) == [TOKEN] and embeds[TOKEN].shape == (1, width) and embeds[TOKEN].dtype == torch.float32
    seeds = [e["seed"] for e in result["images"]]
    for role, model in models.items():
        for kind in ("plain", "token", "prompt"):
            prompts = [e[kind]["prompt"] for e in result["images"]]
            images = plain_diffusers_images(model, out / "learned_embeds.safetensors", prompts, seeds, batch, steps, 16)
            for entry, image in zip(result["images"], images):
                saved = np.asarray(Image.open(out / entry[kind][role]["image"]))
                assert np.array_equal(np.asarray(image), saved), (role, kind, entry["index"])
        for strength in (0.5, 1.0):
            kind = f"denoise-{strength:g}"
            images = img2img_images(model, [out / e[kind]["input"] for e in result["images"]],
                                    [e[kind]["prompt"] for e in result["images"]], seeds, strength, batch, steps)
            for entry, image in zip(result["images"], images):
                saved = np.asarray(Image.open(out / entry[kind][role]["image"]))
                assert np.array_equal(np.asarray(image), saved), (role, kind, entry["index"])

    page = (out / "report.html").read_text()
    assert "<script" not in page and "http" not in page and "&lt;amnesia-concept&gt;" in page
    assert all(name in page for name in ("textual inversion", "partial denoising", "prompt search"))
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == (2 * 5 + 1) * n and all((out / src).is_file() for src in sources)
    summary = format_summary(result)
    assert f"worst case: {result['worst']['after']:.3f} ({worst})" in summary and p["prompt"] in summary
    refuses(["attack", "--model", forgotten_digits, "--output-dir", out], "already holds a finished attack result")


def test_one_kind_and_the_independence_record(forgotten_digits, tmp_path):
    """--method picks one kind; against a model trained with --adversarial, the result says whether the
    attack shared its initial word or templates with the inner attack, and warns when it did."""
    record = json.loads((forgotten_digits / "amnesia.json").read_text())
    trained = perturbed_copy(digits.SHIPPED_MODEL, tmp_path / "adv", {
        **record, "settings": {"adversarial_initializer": "digit"},
        "adversarial": {"token": "<amnesia-adversary>", "prompts": [t.format("<amnesia-adversary>")
                                                                   for t in digits.TRAIN_TEMPLATES]}})
    quick = dict(steps=2, num_images=2, train_batch_size=2, num_inference_steps=2, batch_size=2)
    apart = attack(AttackConfig(model=str(trained), output_dir=str(tmp_path / "a"), method=["ti"], **quick))
    assert list(apart["methods"]) == ["ti"] and not (tmp_path / "a" / "images" / "base" / "prompt").exists()
    ind = apart["independence"]
    assert ind["all_apart"] is True and ind["trained_against"]["initializer"] == "digit"
    assert ind["attack"]["initializer"] == "number" and "warning" not in format_summary(apart)
    assert "attack settings: initial word 'number', 6 templates ('a scribble of the numeral {}', ...), seed streams " \
           "attack, attack-concept, attack-prompt" in format_summary(apart)
    assert "apart from what forget --adversarial trained against (initial word 'digit', 8 templates)" in \
           (tmp_path / "a" / "report.html").read_text().replace("&#x27;", "'")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(digits.TRAIN_TEMPLATES[:2]) + "\n")
    shared = attack(AttackConfig(model=str(trained), output_dir=str(tmp_path / "b"), method=["ti"],
                                 initializer="digit", templates=str(templates), **quick))
    assert shared["independence"]["apart"] == {"initializer": False, "templates": False, "seed_streams": True,
                                               "concept_images": True}
    assert "warning: this attack shares initializer, templates" in format_summary(shared)
    assert "trained against" in (tmp_path / "b" / "report.html").read_text()
    only = attack(AttackConfig(model=str(trained), output_dir=str(tmp_path / "c"), method=["denoise"],
                               strength=[0.5], **quick))
    assert list(only["methods"]) == ["denoise"] and only["worst"]["method"] == "denoise"
    assert not (tmp_path / "c" / "learned_embeds.safetensors").exists()


def test_prompt_vocabulary_is_whole_words_that_tokenize_back(tiny_model, tiny_sdxl_model):
    for pipe in (load_parts(tiny_model)[0], StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)):
        family = family_of(pipe)
        words, ids = vocabulary(pipe, family)
        assert "man" in words and "brad" in words
        for word, each in zip(words, ids):
            for (tok, _), i in zip(family.text_parts(), each):
                assert getattr(pipe, tok).encode(word, add_special_tokens=False) == [i]
        text = " ".join(words[:5])  # a prompt of them tokenizes into exactly their tokens
        assert pipe.tokenizer.encode(text, add_special_tokens=False) == [i[0] for i in ids[:5]]


@pytest.fixture
def concept_images(tmp_path):
    folder = tmp_path / "concept-images"
    folder.mkdir()
    Image.new("RGB", (20, 16), (200, 40, 40)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])  # SD 1.x, 2.x
def test_sd_model_with_own_images_and_clip(kind, tiny_model, tiny_vpred_model, tiny_clip, concept_images, tmp_path):
    tiny_model = tiny_model if kind == "epsilon" else tiny_vpred_model
    model = perturbed_copy(tiny_model, tmp_path / "forgotten", {
        "base_model": str(Path(tiny_model).resolve()), "concepts": ["Brad Pitt"], "surrogate": "a middle aged man",
        "settings": {}})
    result = attack(AttackConfig(model=str(model), output_dir=str(tmp_path / "r"), initializer="man",
                                 concept_images=str(concept_images), steps=2, num_images=2, num_inference_steps=2,
                                 strength=[0.5], prompt_words=2, prompt_steps=2, clip_model=str(tiny_clip)))
    assert result["detector"] == "clip" and result["rate"] == "p_concept" and result["digit"] is None
    assert result["detectors"]["clip"]["loaded"] is True and result["methods"]["ti"]["initializer"] == "man"
    assert result["concept_set"] == {"path": "concept-set", "source": "images", "num_images": 1}
    assert {e["plain"]["prompt"] for e in result["images"]} <= {
        t.format("Brad Pitt") for t in read_prompts(bundled("eval/concept_paraphrases.txt"))}
    assert result["methods"]["ti"]["training_prompts"] == [t.format(TOKEN) for t in
                                                           read_prompts(bundled("attack_templates.txt"))]
    for m in result["methods"].values():
        assert all(0 <= v <= 1 for v in (m["before"], m["after"], m["base"]["before"], m["base"]["after"]))
    # the user's one image is every test image's input to the partial denoising
    assert {e["denoise-0.5"]["input"] for e in result["images"]} == {"concept-set/images/000000.png"}
    # the attack's templates are neither forget's nor the held-out test phrasings
    attack_templates = set(read_prompts(bundled("attack_templates.txt")))
    assert not attack_templates & set(read_prompts(bundled("concept_templates.txt")))
    assert not attack_templates & set(read_prompts(bundled("eval/concept_paraphrases.txt")))


@pytest.fixture(scope="module")
def lora_result(tiny_model, tmp_path_factory):
    """A LoRA result of forget on the tiny model (the adapter and amnesia.json, no pipeline)."""
    from amnesia_sd.commands.forget import forget
    from amnesia_sd.core.config import ForgetConfig
    from helpers import make_sets

    root = make_sets(tiny_model, tmp_path_factory.mktemp("lora-sets"))
    return forget(ForgetConfig(model=str(tiny_model), concept="brad pitt", output_dir=str(root / "lora"),
                               replay_dir=str(root / "replay"), surrogate_dir=str(root / "surrogate"),
                               train_batch_size=2, max_train_steps=2, lora_rank=2, learning_rate=1e-2))


def test_every_kind_on_a_lora_result_replays_with_load_lora_weights(tiny_model, lora_result, concept_images,
                                                                    tmp_path):
    hashes = folder_hashes(lora_result)
    out = tmp_path / "r"
    batch, steps = 2, 2
    result = attack(AttackConfig(model=str(lora_result), output_dir=str(out), initializer="man",
                                 concept_images=str(concept_images), steps=2, num_images=2, num_inference_steps=steps,
                                 batch_size=batch, strength=[0.5], prompt_words=2, prompt_steps=2))
    assert folder_hashes(lora_result) == hashes and list(result["methods"]) == ["ti", "denoise", "prompt"]
    assert "load_lora_weights" in result["methods"]["denoise"]["load_with"]
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_result))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    entries = result["images"]
    images = pipe([e["denoise-0.5"]["prompt"] for e in entries],
                  image=[Image.open(out / e["denoise-0.5"]["input"]) for e in entries], strength=0.5,
                  num_inference_steps=steps, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(e["seed"]) for e in entries]).images
    for entry, image in zip(entries, images):
        saved = np.asarray(Image.open(out / entry["denoise-0.5"]["forgotten"]["image"]))
        assert np.array_equal(np.asarray(image), saved)
    # the adapter changes what the attacked model draws: the base's images differ
    assert any(not np.array_equal(np.asarray(Image.open(out / e["denoise-0.5"]["base"]["image"])),
                                  np.asarray(Image.open(out / e["denoise-0.5"]["forgotten"]["image"])))
               for e in entries)


def test_bad_input_gives_one_line(tiny_model, concept_images, tmp_path):
    model, out = str(tiny_model), tmp_path / "out"
    refuses(["attack", "--model", model, "--output-dir", out], "--base is required")
    refuses(["attack", "--model", model, "--base", model, "--output-dir", out], "--concept is required")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--output-dir",
             Path(model) / "attack"], "lies inside --model")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--concept-images",
             concept_images, "--output-dir", concept_images], "is --concept-images")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--output-dir", tmp_path / "mine",
             "--overwrite"], "exists and is not an amnesia-sd attack result")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--concept-images", empty,
             "--initializer", "man", "--output-dir", out], f"--concept-images {empty} holds no images")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--concept-images",
             concept_images, "--initializer", "middle aged", "--output-dir", out],
            "--initializer 'middle aged' is 2 tokens for this model's tokenizer, not one")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--steps", "4",
             "--measure-steps", "4", "--output-dir", out], "--measure-steps must each be between 0 and --steps (4)")
    common = ["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--output-dir", out]
    refuses([*common, "--method", "gradient"], "--method must be one of ti, denoise, prompt or all, got gradient")
    refuses([*common, "--strength", "0"], "--strength must be in (0, 1], got 0.0")
    refuses([*common, "--strength", "0.3", "--num-inference-steps", "2"],
            "--strength 0.3 with --num-inference-steps 2 runs no denoising step: raise either (at least 4 steps)")
    refuses([*common, "--prompt-words", "0"], "--prompt-words must be positive, got 0")
    bad = tmp_path / "bad-templates.txt"
    bad.write_text("a photo of\n")
    refuses([*common, "--templates", bad, "--method", "ti", "--initializer", "man"],
            "--templates: every line needs exactly one {} where the concept goes, not 'a photo of'")
    refuses([*common, "--method", "ti"], "none of thing, number is one token for this model's tokenizer")
    assert not out.exists() and not (tmp_path / "out.partial").exists()  # a failed run leaves nothing


def test_sdxl_attack_trains_a_row_in_each_text_encoder_and_loads_in_plain_diffusers(tiny_sdxl_model, tiny_clip,
                                                                                    concept_images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = perturbed_copy(tiny_sdxl_model, tmp_path / "forgotten", {
        "base_model": str(Path(tiny_sdxl_model).resolve()), "concepts": ["Brad Pitt"], "surrogate": "a man",
        "settings": {}})
    hashes = folder_hashes(model)
    out = tmp_path / "r"
    result = attack(AttackConfig(model=str(model), output_dir=str(out), initializer="man",
                                 concept_images=str(concept_images), steps=2, num_images=2, num_inference_steps=2,
                                 batch_size=2, strength=[0.5], prompt_words=2, prompt_steps=2,
                                 clip_model=str(tiny_clip)))
    assert folder_hashes(model) == hashes
    assert "clip_g" in result["methods"]["ti"]["load_with"] and result["detector"] == "clip"
    # the prompt search's words are one token in both tokenizers; the partial denoising is SDXL's img2img
    assert "StableDiffusionXLImg2ImgPipeline" in result["methods"]["denoise"]["load_with"]
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(model)
    img2img.scheduler = DDIMScheduler.from_config(img2img.scheduler.config)
    entries = result["images"]
    images = img2img([e["denoise-0.5"]["prompt"] for e in entries],
                     image=[Image.open(out / e["denoise-0.5"]["input"]) for e in entries], strength=0.5,
                     num_inference_steps=2, guidance_scale=7.5,
                     generator=[torch.Generator().manual_seed(e["seed"]) for e in entries]).images
    for entry, image in zip(entries, images):
        assert np.array_equal(np.asarray(image),
                              np.asarray(Image.open(out / entry["denoise-0.5"]["forgotten"]["image"])))
    for word in result["methods"]["prompt"]["prompt"].split():
        assert len(img2img.tokenizer.encode(word, add_special_tokens=False)) == 1
        assert len(img2img.tokenizer_2.encode(word, add_special_tokens=False)) == 1
    embeds = load_file(out / "learned_embeds.safetensors")
    widths = [json.loads((model / enc / "config.json").read_text())["hidden_size"]
              for enc in ("text_encoder", "text_encoder_2")]
    assert sorted(embeds) == ["clip_g", "clip_l"]
    assert [tuple(embeds[k].shape) for k in ("clip_l", "clip_g")] == [(1, widths[0]), (1, widths[1])]
    # Both rows moved from the initializer's, in plain diffusers the token maps to them.
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    man = [pipe.tokenizer.encode("man", add_special_tokens=False)[0],
           pipe.tokenizer_2.encode("man", add_special_tokens=False)[0]]
    starts = [pipe.text_encoder.get_input_embeddings().weight[man[0]].clone(),
              pipe.text_encoder_2.get_input_embeddings().weight[man[1]].clone()]
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(embeds[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
    for encoder, tokenizer, key, start in ((pipe.text_encoder, pipe.tokenizer, "clip_l", starts[0]),
                                           (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g", starts[1])):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row, embeds[key][0]) and not torch.equal(row, start)
    for m in result["methods"].values():
        assert 0 <= m["before"] <= 1 and 0 <= m["after"] <= 1
