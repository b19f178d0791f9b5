"""The embedded digits model: prompts, the evaluation classifier, and building the pipeline."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from amnesia_sd.model import digits


pytestmark = pytest.mark.usefixtures("isolated_cache")  # the classifier trains once per module


def cut_recipe(monkeypatch):
    """The real build recipe, cut to a few steps so that it runs in seconds."""
    for name in ("TEXT_STEPS", "VAE_STEPS", "DENOISER_STEPS"):
        monkeypatch.setattr(digits, name, 2)
    monkeypatch.setattr(digits, "BUILD_EVAL_SAMPLES", 1)


@pytest.fixture
def quick_recipe(monkeypatch):
    cut_recipe(monkeypatch)


@pytest.fixture(scope="module")
def quick_build(isolated_cache, tmp_path_factory):
    """One quick build (seed 3) into a folder of its own, DIR/model, for the tests that only read it."""
    root = tmp_path_factory.mktemp("quick-build")
    with pytest.MonkeyPatch.context() as patch:
        cut_recipe(patch)
        digits.build_digits_model(root / "model", seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def classifier():
    return digits.load_digit_classifier()


def _names(prompt):
    return set(re.findall(r"[a-z]+|\d", prompt.lower()))


def test_prompts_name_their_digit_and_no_other():
    for digit in range(10):
        own = {digits.DIGIT_WORDS[digit], str(digit)}
        others = {name for d in range(10) if d != digit for name in (digits.DIGIT_WORDS[d], str(d))}
        for prompt in digits.train_prompts(digit) + digits.heldout_prompts(digit):
            assert _names(prompt) & own, prompt
            assert not _names(prompt) & others, prompt


def test_heldout_prompts_are_disjoint_from_train_prompts():
    assert not set(digits.TRAIN_TEMPLATES) & set(digits.HELDOUT_TEMPLATES)
    for digit in range(10):
        assert not set(digits.train_prompts(digit)) & set(digits.heldout_prompts(digit))
        assert len(digits.train_prompts(digit)) == 2 * len(digits.TRAIN_TEMPLATES)
    assert all(t.count("{}") == 1 for t in digits.TRAIN_TEMPLATES + digits.HELDOUT_TEMPLATES)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "explicit"))
    assert digits.cache_dir() == tmp_path / "explicit"
    assert digits.default_model_path() == tmp_path / "explicit" / "digits-v1"
    monkeypatch.delenv("AMNESIA_SD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digits.cache_dir() == tmp_path / "xdg" / "amnesia-sd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digits.cache_dir() == tmp_path / "home" / ".cache" / "amnesia-sd"


def heldout_accuracy(classifier) -> tuple[float, dict[int, float]]:
    """The classifier's accuracy on the held-out quarter of the real digits, measured here: in all
    and per digit."""
    images, labels = digits.load_real_digits()
    _, heldout = digits.classifier_split(labels)
    with torch.no_grad():
        correct = classifier(images[heldout]).argmax(1) == labels[heldout]
    per_digit = {d: correct[labels[heldout] == d].float().mean().item() for d in range(10)}
    return correct.float().mean().item(), per_digit


def test_classifier_split_holds_out_a_quarter_of_each_digit():
    images, labels = digits.load_real_digits()
    assert images.shape == (1797, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    train, heldout = digits.classifier_split(labels)
    assert not set(train.tolist()) & set(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(len(labels)))
    for d in range(10):
        assert (labels[heldout] == d).sum() == (labels == d).sum() // 4
    assert torch.equal(heldout, digits.classifier_split(labels)[1])  # fixed, not drawn anew each time


def test_classifier_heldout_accuracy(classifier):
    """The classifier the tool judges with (trained on first use, as users get it), measured on the
    real digits it never trained on: the README claims 98.2%."""
    accuracy, per_digit = heldout_accuracy(classifier)
    assert accuracy >= 0.97, accuracy
    assert min(per_digit.values()) >= 0.9, per_digit  # no digit it cannot tell


def test_classifier_is_cached_as_safetensors(classifier, isolated_cache):
    from safetensors import safe_open

    path = digits.classifier_path()
    assert path.parent == isolated_cache and path.suffix == ".safetensors"
    with safe_open(path, "pt") as f:
        recorded = f.metadata()["heldout_accuracy"]
    assert recorded == f"{heldout_accuracy(classifier)[0]:.4f}"  # the record is the classifier's own accuracy
    reloaded = digits.load_digit_classifier()
    for a, b in zip(classifier.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_rendered_real_digits_classify_as_the_originals(classifier):
    images, labels = digits.load_real_digits()
    _, heldout = digits.classifier_split(labels)
    originals = images[heldout[:100]]
    # As the pipeline returns them: 16x16 RGB with 2x2 pixel blocks, 8-bit.
    gray = [Image.fromarray((x[0].numpy() * 255).round().astype("uint8")) for x in originals]
    pils = [g.resize((16, 16), Image.Resampling.NEAREST).convert("RGB") for g in gray]
    converted = digits.images_to_classifier_input(pils)
    assert converted.shape == originals.shape
    assert torch.allclose(converted, originals, atol=1 / 255)
    with torch.no_grad():
        expected = classifier(originals).argmax(1)
    assert torch.equal(digits.classify(pils, classifier).argmax(1), expected)
    # Plain 8x8 grayscale images go through unchanged too.
    assert torch.equal(digits.images_to_classifier_input(gray), converted)


def test_quick_build_writes_a_plain_diffusers_folder(quick_recipe, quick_build):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = quick_build / "model"  # digits.build_digits_model(DIR / "model", seed=3)
    assert [p.name for p in quick_build.iterdir()] == ["model"]  # no partial folder left behind
    weights = sorted(str(p.relative_to(folder).parent) for p in folder.rglob("*.safetensors"))
    assert weights == ["text_encoder", "unet", "vae"]
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    record = json.loads((folder / "digits.json").read_text())
    assert record["seed"] == 3 and record["version"] == digits.VERSION
    assert set(record["evaluation"]["heldout_prompts"]["per_digit"]) == {str(d) for d in range(10)}
    with pytest.raises(FileExistsError):
        digits.build_digits_model(folder, progress=False)

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000 and config.steps_offset == 1
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a handwritten digit 3", "seven"], num_inference_steps=2).images
    assert [im.size for im in images] == [(digits.IMAGE_SIZE, digits.IMAGE_SIZE)] * 2
    assert digits.classify(images).shape == (2, 10)


def test_same_seed_gives_the_same_weights(quick_recipe, quick_build, tmp_path):
    from safetensors.torch import load_file

    first = quick_build / "model"  # built with seed 3 by the module's fixture
    second = digits.build_digits_model(tmp_path / "b", seed=3, progress=False)
    tokenizer = Path("tokenizer", "tokenizer.json")
    assert (first / tokenizer).read_text() == (second / tokenizer).read_text()
    for path in first.rglob("*.safetensors"):
        a, b = load_file(path), load_file(second / path.relative_to(first))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), path


def test_shipped_model_meets_the_quality_bar_and_is_the_default(classifier):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    record = json.loads((digits.SHIPPED_MODEL / "digits.json").read_text())
    assert record["seed"] == 0 and record["version"] == digits.VERSION
    for prompts in ("train_prompts", "heldout_prompts"):
        assert record["evaluation"][prompts]["min_accuracy"] >= 0.85
    # Measured here, not read from the record: 5 samples per digit and prompt set at the tool's
    # sampling defaults (DDIM 50 steps, guidance 7.5), judged by the classifier.
    pipe = StableDiffusionPipeline.from_pretrained(digits.SHIPPED_MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for prompts_for in (digits.train_prompts, digits.heldout_prompts):
        result = digits.evaluate_digits(pipe, prompts_for, samples_per_digit=5, classifier=classifier)
        accuracy = {d: r["accuracy"] for d, r in result.items()}
        assert min(accuracy.values()) >= 0.8 and sum(accuracy.values()) / 10 >= 0.96, (prompts_for.__name__, accuracy)
    assert not digits.default_model_path().exists()
    assert digits.ensure_digits_model(progress=False) == digits.SHIPPED_MODEL  # nothing to build


def test_shipped_sd3_model_is_a_plain_sd3_pipeline_that_draws_the_digits(classifier):
    """`--model digits-sd3`: StableDiffusion3Pipeline.from_pretrained loads it as it is (its own
    flow-matching scheduler, the 256 T5 rows by default), and it draws the digit it is asked for."""
    from diffusers import StableDiffusion3Pipeline

    from amnesia_sd.model.loading import resolve_model

    shipped = digits.SHIPPED_MODELS["sd3"]
    record = json.loads((shipped / "digits.json").read_text())
    assert record["seed"] == 0 and record["architecture"] == "sd3"
    assert min(record["evaluation"][p]["min_accuracy"] for p in ("train_prompts", "heldout_prompts")) >= 0.85
    assert resolve_model("digits-sd3").location == str(shipped)
    pipe = StableDiffusion3Pipeline.from_pretrained(shipped)
    pipe.set_progress_bar_config(disable=True)
    for prompts_for in (digits.train_prompts, digits.heldout_prompts):
        result = digits.evaluate_digits(pipe, prompts_for, samples_per_digit=2, num_inference_steps=20,
                                        classifier=classifier)
        assert sum(r["accuracy"] for r in result.values()) / 10 >= 0.9, (prompts_for.__name__, result)


@pytest.mark.slow
def test_build_reproduces_the_shipped_model(tmp_path):
    """`amnesia-sd digits build` (seed 0) gives the shipped weights, bit for bit, on this machine kind."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    built = digits.build_digits_model(tmp_path / "digits", seed=0, progress=False)
    for path in digits.SHIPPED_MODEL.rglob("*.safetensors"):
        a, b = load_file(path), load_file(built / path.relative_to(digits.SHIPPED_MODEL))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    pipe = StableDiffusionPipeline.from_pretrained(built)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["the number 4"] * 8, generator=torch.Generator().manual_seed(1)).images
    assert (digits.classify(images).argmax(1) == 4).float().mean() >= 0.75
