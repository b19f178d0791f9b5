"""`amnesia-sd eval`: prompt sets, detectors, the report, and the digits model's demo numbers."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from amnesia_sd.commands.evaluate import EvalConfig, misspellings, read_prompts_csv, evaluate
from amnesia_sd.core.config import GenerationSettings
from amnesia_sd.core.errors import UserError
from amnesia_sd.data.detectors import EXPOSED, NudeNetDetector, Sample, is_nudity, choose_detector, digits_of
from amnesia_sd.data.digit_measures import evaluation_samples, summarize
from amnesia_sd.data.generate import generate
from amnesia_sd.data.prompts import spread, bundled, concept_prompts, read_prompts
from amnesia_sd.data.report import format_summary
from amnesia_sd.model import digits
from amnesia_sd.model.loading import make_accelerator
from amnesia_sd.model.tokenizer import write_word_tokenizer
from amnesia_sd.studies.demo import sample_and_classify

from helpers import ENV, EXE, load_parts, run_command


pytestmark = pytest.mark.usefixtures("isolated_cache")  # the digit classifier is trained into it


def perturbed_copy(source: Path, target: Path, record: dict) -> Path:
    """A stand-in for a forgotten model: the source pipeline with a changed UNet and an amnesia.json."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("digits.json"))
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(1)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in load_file(weights).items()},
              weights)
    (target / "amnesia.json").write_text(json.dumps(record))
    return target


@pytest.fixture(scope="module")
def forgotten_tiny(tiny_model, tmp_path_factory):
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("forgotten") / "out", {
        "base_model": str(Path(tiny_model).resolve()), "concepts": ["Brad Pitt"], "surrogate": "a middle aged man",
        "steps": 3, "settings": {"surrogate": "a middle aged man", "lambda_ewc": 50.0}})


@pytest.fixture(scope="module")
def forgotten_digits(tmp_path_factory):
    return perturbed_copy(digits.SHIPPED_MODEL, tmp_path_factory.mktemp("digits") / "sa", {
        "base_model": str(digits.SHIPPED_MODEL), "concepts": digits.train_prompts(3), "surrogate": "noise"})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel of a few thousand parameters with its processor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = tmp_path_factory.mktemp("clip")
    words = "a an the photo of portrait brad pitt person landscape object painting animal building middle aged man"
    tokenizer = write_word_tokenizer(words.split(), path / "vocab", max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(path / "model")
    processor.save_pretrained(path / "model")
    return path / "model"


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_held_out_prompts_never_met_in_training():
    paraphrases = read_prompts(bundled("eval/concept_paraphrases.txt"))
    templates = read_prompts(bundled("concept_templates.txt"))
    assert len(paraphrases) == 20 and all(p.count("{}") == 1 for p in paraphrases)
    assert not set(paraphrases) & set(templates)
    retain, replay = read_prompts(bundled("eval/retain.txt")), read_prompts(bundled("replay.txt"))
    assert len(retain) == 300 and not set(retain) & set(replay)
    assert misspellings("Brad Pitt") == ["Brd Pitt", "Bard Pitt", "Braad Pitt", "brad pitt", "BradPitt", "bradpitt"]
    assert misspellings("nudity") == ["nudty", "nuidty", "nudiity"]
    assert spread(list("abcdefgh"), 4) == list("aceg") and spread(list("abc"), 5) == list("abcab")
    assert digits_of([digits.train_prompts(3)]) == [3] and digits_of([["zero"], ["the number 7"]]) == [0, 7]
    with pytest.raises(UserError, match="names several"):
        digits_of([["the number 3", "seven"]])
    assert is_nudity(["nudity", "naked"]) and not is_nudity(["Brad Pitt"])
    assert choose_detector("auto", False, ["nudity"]) == "nudenet"
    assert choose_detector("auto", False, ["Brad Pitt"]) == "clip"
    assert choose_detector("auto", True, ["zero"]) == "digits"
    with pytest.raises(UserError, match="digits model only"):
        choose_detector("digits", False, ["Brad Pitt"])


def test_prompts_csv_in_i2p_format(tmp_path):
    good = write_csv(tmp_path / "i2p.csv", [
        ["prompt", "categories", "hard", "sd_seed", "sd_guidance_scale", "sd_image_width"],
        ["a man, in a park", "violence", "1", "2734", "7", "512"],
        ["a <b>bold</b> & strange house", "shocking", "0", "17", "12.5", "512"]])
    assert read_prompts_csv(good) == [Sample("a man, in a park", 2734, 7.0), Sample("a <b>bold</b> & strange house", 17, 12.5)]
    missing = write_csv(tmp_path / "missing.csv", [["prompt", "seed", "sd_guidance_scale"], ["a dog", "1", "7"]])
    with pytest.raises(UserError, match="has no column sd_seed"):
        read_prompts_csv(missing)
    bad_seed = write_csv(tmp_path / "bad.csv", [["prompt", "sd_seed", "sd_guidance_scale"], ["a", "1", "7"],
                                                ["b", "12a", "7"]])
    with pytest.raises(UserError, match=r"line 3: sd_seed '12a' is not an integer"):
        read_prompts_csv(bad_seed)


def skin_blob(path: Path) -> Path:
    """A skin-coloured ellipse on grey: NudeNet's bundled model scores it as exposed buttocks (~0.47)."""
    image = Image.new("RGB", (320, 320), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 100, 260, 300), fill=(225, 180, 150))
    draw.ellipse((150, 190, 170, 210), fill=(180, 120, 100))
    image.save(path)
    return path


def test_nudenet_runs_on_images(tmp_path, monkeypatch):
    blob = skin_blob(tmp_path / "blob.png")
    Image.new("RGB", (320, 320), "white").save(tmp_path / "blank.png")
    paths = [blob, tmp_path / "blank.png"]
    samples = [Sample("x", 0, 7.5)] * 2
    found, blank = NudeNetDetector(threshold=0.3).detect(paths, samples)
    assert blank == {"detections": [], "exposed": {label: 0 for label in EXPOSED}}
    assert [d["label"] for d in found["detections"]] == ["BUTTOCKS_EXPOSED"]
    detection = found["detections"][0]
    assert 0.3 < detection["score"] < 0.6 and len(detection["box"]) == 4
    x, y, w, h = detection["box"]
    assert 0 <= x < 320 and 0 <= y < 320 and w > 50 and h > 50
    assert found["exposed"]["BUTTOCKS_EXPOSED"] == 1 and sum(found["exposed"].values()) == 1
    summary = NudeNetDetector(threshold=0.3).summarize([found, blank], samples)
    assert summary["share_exposed"] == 0.5 and summary["exposed_total"] == 1 and summary["BUTTOCKS_EXPOSED"] == 1
    strict, _ = NudeNetDetector(threshold=0.6).detect(paths, samples)
    assert strict["detections"] == found["detections"] and sum(strict["exposed"].values()) == 0
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if it were not installed
    with pytest.raises(UserError, match=re.escape("pip install 'amnesia-sd[eval]'")):
        NudeNetDetector()


def test_report_on_tiny_model_with_clip_and_csv(forgotten_tiny, tiny_model, tiny_clip, tmp_path):
    rows = write_csv(tmp_path / "i2p.csv", [["prompt", "sd_seed", "sd_guidance_scale", "categories"],
                                            ["a <b>dog</b> & a cat", "123", "3", "x"],
                                            ["a house in a tree", "77", "9.5", "y"]])
    out = tmp_path / "report"
    report = evaluate(EvalConfig(model=str(forgotten_tiny), output_dir=str(out), num_images=2, num_inference_steps=2,
                                 clip_model=str(tiny_clip), prompts_csv=str(rows)))
    assert report == json.loads((out / "report.json").read_text())
    assert report["detector"] == "clip" and report["concepts"] == ["Brad Pitt"]
    assert report["detectors"]["clip"] == {"loaded": True, "model": str(tiny_clip), "headline": ["p_concept", "clip_score"]}
    s = report["settings"]
    assert (s["num_images"], s["seed"], s["num_inference_steps"], s["guidance_scale"], s["resolution"],
            s["batch_size"], s["scheduler"]) == (2, 0, 2, 7.5, 16, 8, "DDIMScheduler")
    assert "a middle aged man" in s["distractors"] and "a person" in s["distractors"]
    base, forgotten = report["models"]["base"], report["models"]["forgotten"]
    assert base["identity"] == str(Path(tiny_model).resolve()) and forgotten["spec"] == str(forgotten_tiny)
    assert re.fullmatch("[0-9a-f]{64}", base["unet_sha256"]) and base["unet_sha256"] != forgotten["unet_sha256"]
    assert forgotten["amnesia"]["concepts"] == ["Brad Pitt"] and forgotten["amnesia"]["settings"]["lambda_ewc"] == 50.0

    sets = report["sets"]
    assert list(sets) == ["concept", "paraphrase", "misspelling", "retained", "csv"]
    assert {i["prompt"] for i in sets["concept"]["images"]} <= set(concept_prompts(["Brad Pitt"], True))
    assert all(any(m in i["prompt"] for m in misspellings("Brad Pitt")) for i in sets["misspelling"]["images"])
    assert {i["prompt"] for i in sets["retained"]["images"]} <= set(read_prompts(bundled("eval/retain.txt")))
    assert [(i["seed"], i["guidance_scale"]) for i in sets["csv"]["images"]] == [(123, 3.0), (77, 9.5)]
    for name, entry in sets.items():
        assert entry["num_images"] == len(entry["images"]) == 2
        for role in ("base", "forgotten"):
            on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "images" / name / role).iterdir())
            assert on_disk == [i[role]["image"] for i in entry["images"]]
            clip = entry["metrics"][role]["clip"]
            assert 0 <= clip["p_concept"] <= 1 and 0 <= clip["clip_score"] <= 100
            per_image = [i[role]["clip"]["p_concept"] for i in entry["images"]]
            assert clip["p_concept"] == pytest.approx(np.mean(per_image))
        for measure in ("ssim", "clip_image"):
            values = [i["similarity"][measure] for i in entry["images"]]
            assert all(-1 <= v <= 1 + 1e-6 for v in values)
            assert entry["metrics"]["similarity"][measure] == pytest.approx(np.mean(values))
    assert {(r["set"], r["metric"]) for r in report["summary"]} >= {("concept", "clip p_concept"),
                                                                    ("retained", "clip clip_score")}

    # Each CSV row is sampled with its own seed and guidance, by both models.
    for role, model in (("base", tiny_model), ("forgotten", forgotten_tiny)):
        pipe, _ = load_parts(model)
        for image in sets["csv"]["images"]:
            [(_, _, expected)] = generate(pipe, [image["prompt"]], [image["seed"]], GenerationSettings(
                num_inference_steps=2, guidance_scale=image["guidance_scale"]))
            assert np.array_equal(np.asarray(expected), np.asarray(Image.open(out / image[role]["image"])))

    page = (out / "report.html").read_text()
    assert "a &lt;b&gt;dog&lt;/b&gt; &amp; a cat" in page and "<b>dog" not in page
    assert "<script" not in page and "http" not in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 2 * sum(e["num_images"] for e in sets.values())
    assert all((out / src).is_file() for src in sources)
    table = format_summary(report)
    assert len(table.splitlines()) < 40 and "clip p_concept" in table
    with pytest.raises(UserError, match="already holds a finished eval report"):
        evaluate(EvalConfig(model=str(forgotten_tiny), output_dir=str(out)))


def test_digits_eval_reproduces_the_demo(forgotten_digits, tmp_path):
    """Same seeds and samples per digit as the demo: the demo's own functions give the same numbers."""
    n, steps, batch = 2, 3, 64
    report = evaluate(EvalConfig(model=str(forgotten_digits), output_dir=str(tmp_path / "r"), num_images=n,
                                 num_inference_steps=steps, batch_size=batch))
    assert report["detector"] == "digits" and report["digits"]["forgotten_digit"] == 3
    assert report["models"]["base"]["identity"] == str(digits.SHIPPED_MODEL)
    sets = report["sets"]
    assert [i["prompt"] for i in sets["concept"]["images"]] == digits.train_prompts(3)[:n]
    assert [i["prompt"] for i in sets["paraphrase"]["images"]] == digits.heldout_prompts(3)[:n]
    assert [i["target"] for i in sets["retained"]["images"]] == [d for d in range(10) if d != 3 for _ in range(n)]

    prompts, seeds = evaluation_samples(3, n, 0)
    settings = GenerationSettings(num_inference_steps=steps, batch_size=batch)
    classifier = digits.load_digit_classifier()
    for role, spec in (("base", str(digits.SHIPPED_MODEL)), ("forgotten", str(forgotten_digits))):
        images, probs = sample_and_classify(spec, prompts, seeds, settings, make_accelerator(), classifier)
        assert report["digits"][role] == summarize(probs[: 10 * n], probs[10 * n :], 3, n)
        concept = sets["concept"]["images"]
        assert [i[role]["digits"]["probs"] for i in concept] == probs[3 * n : 4 * n].tolist()
        for i, expected in zip(concept, images[3 * n : 4 * n]):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / i[role]["image"])), np.asarray(expected))
    for name in ("concept", "paraphrase", "retained"):
        for role in ("base", "forgotten"):
            values = sets[name]["metrics"][role]["digits"]
            assert 0 <= values["p_forgotten"] <= 1 and 0 <= values["entropy"] <= np.log(10) + 1e-6
            assert 0 <= values["accuracy"] <= 1
    assert report["summary"][0] == {"set": "concept", "metric": "digits p_forgotten",
                                    "base": sets["concept"]["metrics"]["base"]["digits"]["p_forgotten"],
                                    "forgotten": sets["concept"]["metrics"]["forgotten"]["digits"]["p_forgotten"]}


def test_cli_offline_without_clip_still_reports(forgotten_tiny, tmp_path):
    args = ["eval", "--model", str(forgotten_tiny), "--output-dir", "r", "--concept", "nudity, naked",
            "--num-images", "1", "--num-inference-steps", "2", "--clip-model", "nonexistent-org/no-clip"]
    # The report run in this process (the same app as the installed command, see helpers.run_command);
    # the refused rerun below through the installed command, for its exit code and stderr.
    done = run_command(*args, cwd=tmp_path)  # asserts exit code 0
    assert ("warning: the clip detector could not be loaded (nonexistent-org/no-clip: " in done.stderr
            and "pass --clip-model PATH to a local CLIP folder. Still ran: nudenet, grayscale SSIM" in done.stderr)
    assert "nudenet share_exposed" in done.stdout and "similarity to base (ssim)" in done.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    clip = report["detectors"]["clip"]
    assert clip["loaded"] is False and clip["reason"] and "--clip-model PATH" in clip["fix"]
    assert report["detector"] == "nudenet" and report["detectors"]["nudenet"]["loaded"] is True
    assert report["similarity_measures"] == ["ssim"]
    for entry in report["sets"].values():
        assert set(entry["metrics"]["base"]) == {"nudenet"} and 0 <= entry["metrics"]["similarity"]["ssim"] <= 1
        assert set(entry["metrics"]["base"]["nudenet"]) == {"share_exposed", "exposed_total", *EXPOSED}
        assert all((tmp_path / "r" / i["forgotten"]["image"]).is_file() for i in entry["images"])
    assert "clip detector not loaded" in (tmp_path / "r" / "report.html").read_text()

    again = subprocess.run([EXE, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "error: r already holds a finished eval report; pass --overwrite to replace it (the old one is kept until "
        "the new one is complete) or pick another --output-dir"]


def test_several_concepts_are_reported_one_by_one(tiny_model, tiny_clip, tmp_path):
    pairs = [{"concept": "Brad Pitt", "surrogate": "a middle aged man", "maps_to": "a middle aged man"},
             {"concept": "nudity, naked", "surrogate_images": "/x", "maps_to": "/x"}]
    model = perturbed_copy(tiny_model, tmp_path / "two", {
        "base_model": str(Path(tiny_model).resolve()), "concepts": ["Brad Pitt", "nudity", "naked"], "pairs": pairs,
        "settings": {"surrogate": []}})
    report = evaluate(EvalConfig(model=str(model), output_dir=str(tmp_path / "r"), num_images=1, num_inference_steps=2,
                                 clip_model=str(tiny_clip), detector="clip"))
    sets = report["sets"]
    assert list(sets) == ["concept-1", "paraphrase-1", "misspelling-1", "concept-2", "paraphrase-2", "misspelling-2",
                          "retained"]
    assert "concept 2 (nudity, naked)" in sets["concept-2"]["description"]
    assert {i["prompt"] for i in sets["concept-2"]["images"]} <= set(concept_prompts(["nudity", "naked"], True))
    assert {i["prompt"] for i in sets["concept-1"]["images"]} <= set(concept_prompts(["Brad Pitt"], True))
    distractors = report["settings"]["distractors"]
    assert "a middle aged man" in distractors and "/x" not in distractors  # prompt surrogates only
    assert {r["set"] for r in report["summary"]} >= {"concept-1", "concept-2"}


def test_digits_eval_of_several_digits(tmp_path):
    model = perturbed_copy(digits.SHIPPED_MODEL, tmp_path / "sa", {
        "base_model": str(digits.SHIPPED_MODEL), "concepts": ["3", "five"],
        "pairs": [{"concept": "3", "surrogate_images": "n", "maps_to": "n"},
                  {"concept": "five", "surrogate_images": "n", "maps_to": "n"}]})
    n = 2
    report = evaluate(EvalConfig(model=str(model), output_dir=str(tmp_path / "r"), num_images=n, num_inference_steps=2,
                                 batch_size=64))
    d = report["digits"]
    assert d["forgotten_digits"] == [3, 5] and "forgotten_digit" not in d
    assert set(d["forgotten"]["per_digit"]) == {"3", "5"}  # as in the JSON file
    concept = report["sets"]["concept"]["images"]
    assert [i["target"] for i in concept] == [3] * n + [5] * n
    assert [i["target"] for i in report["sets"]["paraphrase"]["images"]] == [3] * n + [5] * n
    assert [i["target"] for i in report["sets"]["retained"]["images"]] == [d for d in range(10) if d not in (3, 5)
                                                                          for _ in range(n)]
    # p_forgotten of an image is that of either forgotten digit
    image = concept[0]["forgotten"]["digits"]
    assert image["p_forgotten"] == pytest.approx(image["probs"][3] + image["probs"][5])
    assert "digits 3, 5" in format_summary(report)
