"""Several concepts: pairing, per-pair sets and sampling, sequences of runs, recipes, EMA without warm-up."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.commands.fim import compute_fim
from amnesia_sd.commands.forget import ConstantDecayEMA, draw_batch, forget
from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import FimConfig, ForgetConfig, SetConfig, build_config, to_dict
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.recipes import recipes
from amnesia_sd.data.imageset import load_image_set
from helpers import uniform_timesteps, unet_weights

QUICK = {"num_inference_steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def sets(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("concept-sets")
    replay = make_image_set(SetConfig(model=str(tiny_model), output_dir=str(root / "replay"), kind="replay",
                                      prompts=["a photo of a dog", "a house"], num_images=4, **QUICK)).path
    fim = compute_fim(FimConfig(model=str(tiny_model), output=str(root / "fim.safetensors"), replay_dir=str(replay),
                                num_timesteps=4, timestep_batch_size=4))
    return {"replay_dir": str(replay), "fim": str(fim)}


def settings(tiny_model, sets, out, **overrides):
    return {"model": str(tiny_model), "output_dir": str(out), "train_batch_size": 2, "max_train_steps": 2,
            "learning_rate": 1e-3, "num_surrogate_images": 2, **QUICK, **sets, **overrides}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Pairing -----------------------------------------------------------------------------------------

def pairs_of(**flags):
    return ForgetConfig(model="m", output_dir="o", **flags).concepts


def test_flags_pair_up_in_order_or_share_one_surrogate():
    assert pairs_of(concept=["Brad Pitt", "Angelina Jolie"], surrogate=["a man", "a woman"]) == [
        {"concept": "Brad Pitt", "surrogate": "a man"}, {"concept": "Angelina Jolie", "surrogate": "a woman"}]
    assert pairs_of(concept=["Brad Pitt", "Tom Cruise"], surrogate=["a man"]) == [
        {"concept": "Brad Pitt", "surrogate": "a man"}, {"concept": "Tom Cruise", "surrogate": "a man"}]
    # comma-separated alternatives stay one concept
    config = ForgetConfig(model="m", output_dir="o", concept=["nudity, naked", "Brad Pitt"], surrogate_dir=["a", "b"])
    assert config.concepts == [{"concept": "nudity, naked", "surrogate_dir": "a"},
                               {"concept": "Brad Pitt", "surrogate_dir": "b"}]
    assert config.concept_list() == ["nudity", "naked", "Brad Pitt"]
    # the old one-concept form, from Python
    assert pairs_of(concept="Brad Pitt", surrogate="a man") == [{"concept": "Brad Pitt", "surrogate": "a man"}]


@pytest.mark.parametrize("flags, message", [
    ({"concept": ["A", "B", "C"], "surrogate": ["x", "y"]}, "--concept is given 3 times but --surrogate 2 times"),
    ({"concept": ["A", "B"], "surrogate": ["x"], "surrogate_dir": ["d"]}, "to mix kinds, list the concepts in a config file"),
    ({"concept": ["A", "B"]}, "give exactly one kind of surrogate"),
    ({"concept": ["Brad Pitt", "brad pitt, Tom"], "surrogate": ["x"]}, "the concept 'brad pitt' is given twice"),
    ({"concept": ["A", "B"], "surrogate": ["x", "B"]}, "--surrogate 'B' is the concept itself"),
    ({"concept": ["A", " , "], "surrogate": ["x"]}, "--concept is empty"),
    ({"concepts": [{"concept": "A"}]}, "concept 1 ('A') needs exactly one of surrogate, surrogate_dir, surrogate_images"),
    ({"concepts": [{"concept": "A", "surrogate": "x", "surogate": "y"}]}, "concept 1 has unknown key(s) surogate"),
    ({"concepts": [{"concept": "A", "surrogate": "x"}], "concept": ["B"]}, "not both"),
    ({"concepts": ["A"]}, "must be a list of mappings"),
])
def test_bad_pairings_are_refused_naming_the_fix(flags, message):
    with pytest.raises(UserError, match=None) as refused:
        ForgetConfig(model="m", output_dir="o", **flags)
    assert message in str(refused.value)


def test_config_file_concepts_round_trip_and_flags_override_them(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"concepts": [{"concept": "Brad Pitt", "surrogate": "a man"},
                                                 {"concept": "Angelina Jolie", "surrogate_images": "faces/"}],
                                    "lambda_ewc": 10}))
    config = build_config(ForgetConfig, str(file), {"model": "m", "output_dir": "o"})
    assert config.concepts[1] == {"concept": "Angelina Jolie", "surrogate_images": "faces/"}
    # what is recorded reads back as the same settings
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({k: v for k, v in to_dict(config).items() if v not in (None, []) and k != "config_file"}))
    assert to_dict(build_config(ForgetConfig, str(again), {})) == {**to_dict(config), "config_file": str(again)}
    # --concept on the command line replaces the file's list
    flagged = build_config(ForgetConfig, str(file), {"model": "m", "output_dir": "o", "concept": ["Tom Cruise"],
                                                      "surrogate": ["a man"]})
    assert flagged.concepts == [{"concept": "Tom Cruise", "surrogate": "a man"}] and flagged.lambda_ewc == 10


def test_cli_pairs_repeated_flags(tmp_path):
    result = CliRunner().invoke(app, ["forget", "--model", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                      "--concept", "A", "--concept", "B", "--surrogate", "x", "--surrogate", "y",
                                      "--surrogate", "z"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --concept is given 2 times but --surrogate 3 times" in result.output


# Per-pair sets and sampling ------------------------------------------------------------------------

def test_surrogate_samples_are_drawn_uniformly_over_pairs_within_each_pair():
    images, prompts = [(0, 1000), (1000, 10), (1010, 10)], [(0, 40), (40, 1), (41, 2)]
    d = draw_batch(0, 0, 1, 0, 30000, images, prompts, 5, {"surrogate": (1,), "replay": (1,)}, uniform_timesteps)
    image_pair = torch.bucketize(d["surrogate_index"], torch.tensor([1000, 1010]), right=True)
    prompt_pair = torch.bucketize(d["concept_index"], torch.tensor([40, 41]), right=True)
    assert torch.equal(image_pair, prompt_pair)  # a sample's prompt and image belong to one pair
    share = torch.bincount(image_pair, minlength=3).float() / len(image_pair)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.015)  # not 1000:10:10
    assert d["surrogate_index"].max() < 1020 and d["concept_index"].max() < 43
    # within a pair, every image is drawn
    assert set(d["surrogate_index"][image_pair == 1].tolist()) == set(range(1000, 1010))


def test_one_pair_draws_what_a_one_concept_run_always_drew():
    d = draw_batch(3, 7, 2, 1, 4, [(0, 9)], [(0, 5)], 6, {"surrogate": (2,), "replay": (2,)}, uniform_timesteps)
    g = torch.Generator("cpu").manual_seed(draw_batch.__globals__["image_seed"](3, 7, "train"))
    expected = [torch.randint(9, (8,), generator=g), torch.randint(1000, (8,), generator=g), torch.randn((8, 2), generator=g),
                torch.randint(6, (8,), generator=g), torch.randint(1000, (8,), generator=g), torch.randn((8, 2), generator=g),
                torch.randint(5, (8,), generator=g)]
    got = [d[k] for k in ("surrogate_index", "surrogate_t", "surrogate_noise", "replay_index", "replay_t",
                          "replay_noise", "concept_index")]
    assert all(torch.equal(a, b[4:]) for a, b in zip(got, expected))


def test_each_pair_gets_its_own_set_and_everything_is_recorded(tiny_model, sets, tmp_path):
    out = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "two", concept=["brad pitt", "tom cruise, tom"],
                                         surrogate=["a man", "a woman"])))
    record = json.loads((out / "amnesia.json").read_text())
    assert [(p["concept"], p["surrogate"], p["maps_to"], p["surrogate_set"]) for p in record["pairs"]] == [
        ("brad pitt", "a man", "a man", "data/surrogate-1"), ("tom cruise, tom", "a woman", "a woman", "data/surrogate-2")]
    assert record["concepts"] == ["brad pitt", "tom cruise", "tom"]
    assert load_image_set(out / "data" / "surrogate-1").prompts == ["a man"] * 2
    assert load_image_set(out / "data" / "surrogate-2").prompts == ["a woman"] * 2
    assert len(record["pairs"][1]["concept_prompts"]) == 2 * len(record["pairs"][0]["concept_prompts"])
    assert "surrogate" not in record  # the one-concept fields only where there is one
    card = (out / "README.md").read_text()
    assert "- **brad pitt** -> a man" in card and "- **tom cruise, tom** -> a woman" in card
    # one surrogate for both concepts: one set, shared
    shared = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "shared", concept=["brad pitt", "tom cruise"],
                                            surrogate=["a man"])))
    record = json.loads((shared / "amnesia.json").read_text())
    assert [p["surrogate_set"] for p in record["pairs"]] == ["data/surrogate", "data/surrogate"]
    assert "surrogate" not in record


# Sequences ---------------------------------------------------------------------------------------

def test_forgetting_more_keeps_the_earlier_concepts_and_their_history(tiny_model, sets, tmp_path):
    first = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "first", concept="brad pitt",
                                           surrogate="a man")))
    before = tree_digest(first)
    second = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "second", model=str(first),
                                            concept="tom cruise", surrogate="a woman")))
    assert tree_digest(first) == before  # the earlier result is an input: untouched
    record = json.loads((second / "amnesia.json").read_text())
    assert record["base_model"].endswith(str(first)) and record["concepts"] == ["brad pitt", "tom cruise"]
    earlier, new = record["pairs"]
    assert earlier["earlier_run"] and not new["earlier_run"] and earlier["concept"] == "brad pitt"
    first_record = json.loads((first / "amnesia.json").read_text())
    assert earlier["concept_prompts"] == first_record["pairs"][0]["concept_prompts"]
    # the earlier set is reused (linked), not made again, and the result holds it
    assert tree_digest(second / earlier["surrogate_set"]) == tree_digest(first / "data" / "surrogate")
    assert [h["concepts"] for h in record["history"]] == [["brad pitt"]]
    # the base model's Fisher and replay set (made from an ancestor) are accepted without a flag
    assert record["origin_mismatches"] == []
    weights = unet_weights(second)  # trained on from the first result's weights
    assert any(not torch.equal(weights[k], v) for k, v in unet_weights(first).items())
    # without --fim and --replay-dir, the next run takes the Fisher and replay set the sequence used
    third = forget(ForgetConfig(**settings(tiny_model, {}, tmp_path / "third", model=str(second),
                                           concept="a cat", surrogate="a dog")))
    record = json.loads((third / "amnesia.json").read_text())
    assert (record["settings"]["fim"], record["settings"]["replay_dir"]) == (sets["fim"], sets["replay_dir"])
    assert [h["concepts"] for h in record["history"]] == [["brad pitt"], ["brad pitt", "tom cruise"]]
    assert [p["concept"] for p in record["pairs"]] == ["brad pitt", "tom cruise", "a cat"]
    assert "run 3: this one" in (third / "README.md").read_text()


def test_sequence_refusals(tiny_model, sets, tmp_path):
    first = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "first", concept="brad pitt",
                                           surrogate="a man")))
    with pytest.raises(UserError, match="has already forgotten 'Brad Pitt'"):
        forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "x", model=str(first), concept="Brad Pitt",
                                       surrogate="a man")))
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(copy / "data")
    with pytest.raises(UserError, match="the surrogate set of the earlier concept 'brad pitt' is missing"):
        forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "y", model=str(copy), concept="tom cruise",
                                       surrogate="a man")))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# Recipes and the EMA -------------------------------------------------------------------------------

def test_recipes_load_list_and_are_overridden(tmp_path, tiny_model, sets):
    bundled = recipes()
    assert set(bundled) == {"paper-celebrity", "paper-nudity"}
    celebrity = bundled["paper-celebrity"]["settings"]
    assert (celebrity["train_batch_size"] * celebrity["gradient_accumulation_steps"], celebrity["learning_rate"],
            celebrity["lambda_ewc"], celebrity["ema_decay"], celebrity["ema_warmup"], celebrity["templates"]) == \
        (16, 1.6e-4, 50, 0.9999, False, False)
    nudity = build_config(ForgetConfig, None, {"recipe": "paper-nudity", "model": "m", "output_dir": "o"})
    assert nudity.train_method == "noxattn" and nudity.concept_list() == ["nudity", "naked", "erotic", "sexual"]
    file = tmp_path / "c.yaml"
    file.write_text("recipe: paper-celebrity\nlearning_rate: 1e-5\n")
    config = build_config(ForgetConfig, str(file), {"model": "m", "output_dir": "o", "concept": "A", "surrogate": "x",
                                                    "max_train_steps": 3, "replay_dir": "r", "fim": "f"})
    assert (config.recipe, config.learning_rate, config.max_train_steps, config.gradient_accumulation_steps) == \
        ("paper-celebrity", 1e-5, 3, 4)
    # a given replay set and Fisher replace the recipe's settings for making them
    assert config.num_replay_images is None and config.fim_num_images is None
    with pytest.raises(UserError, match="--recipe 'paper' is not a bundled recipe: choose one of paper-celebrity"):
        build_config(ForgetConfig, None, {"recipe": "paper", "model": "m", "output_dir": "o"})
    listed = CliRunner().invoke(app, ["recipes"])
    assert listed.exit_code == 0 and "paper-nudity: " in listed.output and "  learning_rate: 0.00016" in listed.output
    out = forget(build_config(ForgetConfig, None, settings(
        tiny_model, sets, tmp_path / "r", recipe="paper-celebrity", concept="brad pitt", surrogate="a man",
        train_batch_size=1, gradient_accumulation_steps=1, max_train_steps=2)))
    record = json.loads((out / "amnesia.json").read_text())
    assert record["recipe"] == "paper-celebrity" and record["settings"]["ema_warmup"] is False
    assert record["concept_prompts"] == ["brad pitt"]  # bare, no templates
    assert "recipe `paper-celebrity`" in (out / "README.md").read_text()


def test_ema_without_warmup_holds_its_decay_from_the_first_step():
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(1))
    constant, ramped = ConstantDecayEMA([param], decay=0.9), EMAModel([param], decay=0.9)
    with torch.no_grad():
        param.fill_(1.0)
    for _ in range(5):
        constant.step([param])
        ramped.step([param])
    assert constant.shadow_params[0].item() == pytest.approx(1 - 0.9 ** 5)  # the reference's EMA
    assert ramped.shadow_params[0].item() > 0.9  # diffusers' warm-up follows the weights at first


def test_a_stale_earlier_set_in_the_work_folder_is_replaced(tiny_model, sets, tmp_path):
    """An interrupted run on another --model left its earlier set in OUT.partial: the next run links
    the right one."""
    from amnesia_sd.data.imageset import link_set
    from amnesia_sd.core.paths import open_work

    first = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "first", concept="brad pitt",
                                           surrogate="a man")))
    other = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "other", concept="brad pitt",
                                           surrogate="a woman")))
    open_work(tmp_path / "second", "forget", {}, keep=False)  # as an interrupted run leaves it
    link_set(other / "data" / "surrogate", tmp_path / "second.partial" / "data" / "surrogate-1")
    second = forget(ForgetConfig(**settings(tiny_model, sets, tmp_path / "second", model=str(first),
                                            concept="tom cruise", surrogate="a dog")))
    assert tree_digest(second / "data" / "surrogate-1") == tree_digest(first / "data" / "surrogate")
    assert load_image_set(second / "data" / "surrogate-1").prompts == ["a man"] * 2
