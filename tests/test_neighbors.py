"""`amnesia-sd eval --neighbors`: how much of each neighbour of the concept a forgotten model keeps
against its base on the same seeds, and the pinpoint score over them (HUB's over-erasure)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amnesia_sd.commands.evaluate import EvalConfig, evaluate
from amnesia_sd.core.config import GenerationSettings
from amnesia_sd.data.generate import generate, image_seed
from amnesia_sd.data.neighbors import kept, pinpoint
from amnesia_sd.data.prompts import bundled, read_prompts
from amnesia_sd.data.report import format_summary
from amnesia_sd.model import digits

from helpers import load_parts, run_command
from test_eval import perturbed_copy, tiny_clip  # noqa: F401 (tiny_clip: a fixture)


pytestmark = pytest.mark.usefixtures("isolated_cache")  # the digit classifier is trained into it
QUICK = {"num_images": 1, "num_inference_steps": 2}


def record_of(base) -> dict:
    return {"base_model": str(Path(base).resolve()), "concepts": ["Brad Pitt"], "surrogate": "a middle aged man"}


def same_copy(base, target: Path) -> Path:
    """A "forgotten" model whose UNet is the base's own: it must keep every neighbour."""
    shutil.copytree(base, target)
    (target / "amnesia.json").write_text(json.dumps(record_of(base)))
    return target


def test_kept_and_pinpoint():
    assert kept([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert kept([False, False], [True, True]) is None  # the base never shows it: nothing to keep
    assert pinpoint({"a": {"kept": 1.0}, "b": {"kept": 0.5}, "c": {"kept": None}}) == 0.75
    assert pinpoint({"a": {"kept": None}}) is None


@pytest.mark.parametrize("family", ["tiny_model", "tiny_sdxl_model"])
def test_neighbors_of_sd_models(family, request, tiny_clip, tmp_path):
    base = request.getfixturevalue(family)
    model = perturbed_copy(base, tmp_path / "forgotten", record_of(base))
    out = tmp_path / "report"
    report = evaluate(EvalConfig(model=str(model), output_dir=str(out), clip_model=str(tiny_clip),
                                 neighbors="man, woman", neighbor_images=3, **QUICK))
    neighbors = report["neighbors"]
    assert (neighbors["list"], neighbors["names"], neighbors["judge"], neighbors["num_images"]) == (
        "man, woman", ["man", "woman"], "clip", 3)
    phrasings = read_prompts(bundled("eval/concept_paraphrases.txt"))
    seeds = [image_seed(0, i, "neighbor") for i in range(3)]
    other_seeds = {i["seed"] for s in report["sets"].values() for i in s["images"]}
    assert not set(seeds) & other_seeds and "neighbor-1" not in report["sets"]
    pipe, _ = load_parts(base) if family == "tiny_model" else (None, None)
    for name, entry in neighbors["per_neighbor"].items():
        images = entry["images"]
        assert [i["seed"] for i in images] == seeds  # image i of every neighbour starts from the same noise
        assert all(i["prompt"] in [p.format(name) for p in phrasings] for i in images)
        for role in ("base", "forgotten"):
            assert all((out / i[role]["image"]).is_file() and 0 <= i[role]["neighbor"]["p"] <= 1 for i in images)
            assert entry[f"{role}_rate"] == pytest.approx(np.mean([i[role]["neighbor"]["shows"] for i in images]))
        shown = [i["forgotten"]["neighbor"]["shows"] for i in images if i["base"]["neighbor"]["shows"]]
        assert entry["kept"] == (pytest.approx(np.mean(shown)) if shown else None)
        for measure in ("clip_image", "ssim"):
            assert entry["similarity"][measure] == pytest.approx(np.mean([i["similarity"][measure] for i in images]))
        if pipe is not None:  # eval's own sampling path: the base's images repeat from their prompts and seeds
            expected = generate(pipe, [i["prompt"] for i in images], seeds, GenerationSettings(num_inference_steps=2))
            for (_, _, image), entry_image in zip(expected, images):
                assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / entry_image["base"]["image"])))
    kept_values = [e["kept"] for e in neighbors["per_neighbor"].values() if e["kept"] is not None]
    assert neighbors["pinpoint"] == (pytest.approx(np.mean(kept_values)) if kept_values else None)
    assert {"set": "neighbors", "metric": "pinpoint (share kept)", "base": None,
            "forgotten": neighbors["pinpoint"]} in report["summary"]
    assert re.search(r"^pinpoint (\d\.\d{3} over (\d of )?2 neighbours|: none)", format_summary(report), re.M)
    page = (out / "report.html").read_text()
    assert "<h2 id=neighbors>" in page and all(f'src="{i["forgotten"]["image"]}"' in page
                                               for e in neighbors["per_neighbor"].values() for i in e["images"])


def test_identical_model_keeps_every_neighbour(tiny_model, tiny_clip, tmp_path):
    report = evaluate(EvalConfig(model=str(same_copy(tiny_model, tmp_path / "same")), output_dir=str(tmp_path / "r"),
                                 clip_model=str(tiny_clip), neighbors="man, woman", neighbor_images=4, **QUICK))
    neighbors = report["neighbors"]
    assert neighbors["pinpoint"] == 1.0
    for entry in neighbors["per_neighbor"].values():
        assert entry["base_rate"] == entry["forgotten_rate"] and entry["kept"] in (1.0, None)
        assert entry["similarity"]["clip_image"] == pytest.approx(1, abs=1e-5) and entry["similarity"]["ssim"] == 1


def test_without_clip_neighbours_get_pixel_similarity_only(tiny_model, tmp_path):
    model = perturbed_copy(tiny_model, tmp_path / "forgotten", record_of(tiny_model))
    report = evaluate(EvalConfig(model=str(model), output_dir=str(tmp_path / "r"), clip_model="nonexistent-org/no-clip",
                                 neighbors="woman", neighbor_images=2, **QUICK))
    neighbors = report["neighbors"]
    assert report["detectors"]["clip"]["loaded"] is False
    assert neighbors["judge"] is None and neighbors["pinpoint"] is None and list(neighbors["similarity"]) == ["ssim"]
    entry = neighbors["per_neighbor"]["woman"]
    assert entry["base_rate"] is entry["forgotten_rate"] is entry["kept"] is None
    assert 0 < entry["similarity"]["ssim"] < 1 and "neighbor" not in entry["images"][0]["base"]
    assert "pinpoint: none over 1 neighbour (no judge: the clip detector was not loaded)" in format_summary(report)


def test_digits_model_pinpoint(tmp_path):
    """The digits model against itself keeps every neighbour; a perturbed copy loses some of them."""
    n, shipped = 4, str(digits.SHIPPED_MODEL)
    config = dict(base=shipped, concept="3", num_images=n, num_inference_steps=5, batch_size=64,
                  neighbors="1, eight, the number 5")
    same = evaluate(EvalConfig(model=shipped, output_dir=str(tmp_path / "same"), **config))["neighbors"]
    assert same["judge"] == "digits" and same["num_images"] == n and same["pinpoint"] == 1.0
    assert {name: e["digit"] for name, e in same["per_neighbor"].items()} == {"1": 1, "eight": 8, "the number 5": 5}

    changed = perturbed_copy(digits.SHIPPED_MODEL, tmp_path / "changed", {})
    report = evaluate(EvalConfig(model=str(changed), output_dir=str(tmp_path / "changed-report"), **config))
    neighbors, retained = report["neighbors"], report["sets"]["retained"]["images"]
    assert neighbors["pinpoint"] < 1.0
    for entry in neighbors["per_neighbor"].values():
        # The retained set's images of the digit, read by the classifier: nothing sampled twice.
        own = [i for i in retained if i["target"] == entry["digit"]]
        assert [i["forgotten"]["image"] for i in entry["images"]] == [i["forgotten"]["image"] for i in own]
        reads = {role: [i[role]["digits"]["predicted"] == entry["digit"] for i in own]
                 for role in ("base", "forgotten")}
        assert entry["kept"] == kept(reads["base"], reads["forgotten"])
        assert entry["base_rate"] == np.mean(reads["base"]) and entry["forgotten_rate"] == np.mean(reads["forgotten"])
    assert "pinpoint" in format_summary(report) and "3 neighbours" in format_summary(report)


@pytest.mark.parametrize("args, message", [
    (["--neighbors", ""], "--neighbors is empty: give names separated by commas"),
    (["--neighbors", " , "], "--neighbors is empty: give names separated by commas"),
    (["--neighbors", "woman, brad pitt"], "--neighbors names 'brad pitt', which is the concept being forgotten"),
    (["--neighbors", "woman", "--neighbor-images", "0"], "--neighbor-images must be positive, got 0"),
    (["--neighbor-images", "2"], "--neighbor-images needs --neighbors"),
    (["--digits", "--neighbors", "three"], "--neighbors names 'three', the digit 3 being forgotten"),
    (["--digits", "--neighbors", "eight, 8"], "--neighbors names the digit 8 twice ('eight' and '8')"),
    (["--digits", "--neighbors", "celebrities"], "--neighbors names 'Tom Cruise', which is no digit"),
    (["--digits", "--neighbors", "1", "--neighbor-images", "3"], "--neighbor-images 3 is more than the 2 images"),
])
def test_bad_neighbors_are_refused_before_any_model_loads(args, message, tiny_model, tmp_path, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("amnesia_sd.commands.evaluate.load_on_device", no_model)
    if args[0] == "--digits":
        model = ["--model", digits.SHIPPED_MODEL, "--base", digits.SHIPPED_MODEL, "--concept", "3", "--num-images", "2"]
        args = args[1:]
    else:
        model = ["--model", same_copy(tiny_model, tmp_path / "m")]
    result = run_command("eval", *model, "--output-dir", "r", *args, cwd=tmp_path, code=2)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}") and not (tmp_path / "r").exists()
