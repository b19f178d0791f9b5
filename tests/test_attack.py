"""`amnesia-sd attack`: only the token trains, its file loads in plain diffusers, bad input is refused."""

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from amnesia_sd.commands.attack import TOKEN, AttackConfig, attack
from amnesia_sd.data.imageset import ImageSet
from amnesia_sd.data.prompts import bundled, read_prompts
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


def test_digits_attack_end_to_end(forgotten_digits, tmp_path):
    models = {"base": digits.SHIPPED_MODEL, "forgotten": forgotten_digits}
    hashes = {role: folder_hashes(path) for role, path in models.items()}
    out = tmp_path / "attack"
    n, batch, steps = 3, 2, 2
    result = attack(AttackConfig(model=str(forgotten_digits), output_dir=str(out), steps=4, num_images=n,
                                     train_batch_size=2, num_inference_steps=steps, batch_size=batch,
                                     measure_steps=[2]))
    assert result == json.loads((out / "attack.json").read_text())
    assert {role: folder_hashes(path) for role, path in models.items()} == hashes  # inputs untouched

    assert result["tool"] == "amnesia-sd" and result["command"] == "attack"
    assert result["token"] == TOKEN and result["initializer"] == "digit" and result["detector"] == "digits"
    assert result["rate"] == "p_forgotten" and result["concepts"] == digits.train_prompts(3) and result["digit"] == 3
    s = result["settings"]
    assert (s["steps"], s["num_images"], s["learning_rate"], s["train_batch_size"], s["seed"], s["batch_size"],
            s["num_inference_steps"], s["image_size"]) == (4, n, 5e-3, 2, 0, batch, steps, 16)
    for role in ("base", "forgotten"):
        m = result["models"][role]
        assert all(isinstance(m[k], float) and 0 <= m[k] <= 1 for k in ("before", "after"))
    assert result["models"]["base"]["identity"] == str(digits.SHIPPED_MODEL)
    assert result["attack_success"] == result["models"]["forgotten"]["after"]
    by_steps = result["models"]["forgotten"]["after_by_steps"]  # the token after 2 of its 4 steps, and after 4
    assert list(by_steps) == ["2", "4"] and by_steps["4"] == result["attack_success"] and 0 <= by_steps["2"] <= 1
    assert len(list((out / "images" / "forgotten" / "token-at-2").glob("*.png"))) == n
    t = result["training"]
    assert t["steps"] == len(t["losses"]) == 4 and all(math.isfinite(v) and v >= 0 for v in t["losses"])
    assert result["concept_set"] == {"path": "concept-set", "source": "generated", "num_images": n}
    assert len(list((out / "concept-set" / "images").iterdir())) == n
    assert all(TOKEN in p for p in result["training_prompts"])
    assert isinstance(result["seconds"], float) and result["seconds"] > 0

    # Held-out phrasings, the same seed for both kinds; per image the classifier's numbers.
    heldout = set(digits.heldout_prompts(3))
    for entry in result["images"]:
        assert entry["plain"]["prompt"] in heldout and TOKEN in entry["token"]["prompt"]
        assert entry["token"]["prompt"].replace(TOKEN, "three") in heldout
        for kind in ("plain", "token"):
            for role in ("base", "forgotten"):
                assert (out / entry[kind][role]["image"]).is_file()
                assert 0 <= entry[kind][role]["digits"]["p_forgotten"] <= 1

    # The embedding in diffusers' format reproduces the attack's images in plain diffusers.
    embeds = load_file(out / "learned_embeds.safetensors")
    width = json.loads((forgotten_digits / "text_encoder" / "config.json").read_text())["hidden_size"]
    assert list(embeds) == [TOKEN] and embeds[TOKEN].shape == (1, width) and embeds[TOKEN].dtype == torch.float32
    for role, model in models.items():
        for kind in ("plain", "token"):
            prompts = [e[kind]["prompt"] for e in result["images"]]
            images = plain_diffusers_images(model, out / "learned_embeds.safetensors", prompts,
                                            [e["seed"] for e in result["images"]], batch, steps, 16)
            for entry, image in zip(result["images"], images):
                saved = np.asarray(Image.open(out / entry[kind][role]["image"]))
                assert np.array_equal(np.asarray(image), saved), (role, kind, entry["index"])

    page = (out / "report.html").read_text()
    assert "<script" not in page and "http" not in page and "&lt;amnesia-concept&gt;" in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 4 * n and all((out / src).is_file() for src in sources)
    refuses(["attack", "--model", forgotten_digits, "--output-dir", out], "already holds a finished attack result")


@pytest.fixture
def concept_images(tmp_path):
    folder = tmp_path / "concept-images"
    folder.mkdir()
    Image.new("RGB", (20, 16), (200, 40, 40)).save(folder / "a.png")
    return folder


def test_sd_model_with_own_images_and_clip(tiny_model, tiny_clip, concept_images, tmp_path):
    model = perturbed_copy(tiny_model, tmp_path / "forgotten", {
        "base_model": str(Path(tiny_model).resolve()), "concepts": ["Brad Pitt"], "surrogate": "a middle aged man",
        "settings": {}})
    result = attack(AttackConfig(model=str(model), output_dir=str(tmp_path / "r"), initializer="man",
                                     concept_images=str(concept_images), steps=2, num_images=2, num_inference_steps=2,
                                     clip_model=str(tiny_clip)))
    assert result["detector"] == "clip" and result["rate"] == "p_concept" and result["digit"] is None
    assert result["detectors"]["clip"]["loaded"] is True and result["initializer"] == "man"
    assert result["concept_set"] == {"path": "concept-set", "source": "images", "num_images": 1}
    assert {e["plain"]["prompt"] for e in result["images"]} <= {
        t.format("Brad Pitt") for t in read_prompts(bundled("eval/concept_paraphrases.txt"))}
    for m in result["models"].values():
        assert 0 <= m["before"] <= 1 and 0 <= m["after"] <= 1


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
             "--output-dir", out], f"--concept-images {empty} holds no images")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--concept-images",
             concept_images, "--initializer", "middle aged", "--output-dir", out],
            "--initializer 'middle aged' is 2 tokens for this model's tokenizer, not one")
    refuses(["attack", "--model", model, "--base", model, "--concept", "brad pitt", "--steps", "4",
             "--measure-steps", "4", "--output-dir", out], "--measure-steps must each be between 0 and --steps (4)")
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
                                     clip_model=str(tiny_clip)))
    assert folder_hashes(model) == hashes
    assert "clip_g" in result["load_with"] and result["detector"] == "clip"
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
    for m in result["models"].values():
        assert 0 <= m["before"] <= 1 and 0 <= m["after"] <= 1
