"""forget --preserve: the neighbours' set drawn by the base model, cached, replayed with the replay set
and recorded; sequences, SDXL, LoRA, resume; bad values refused from the CLI before any work."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.commands import forget as forget_module
from amnesia_sd.commands.fim import compute_fim
from amnesia_sd.commands.forget import forget
from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import ForgetConfig, FimConfig, SetConfig, build_config
from amnesia_sd.core.errors import Interrupted
from amnesia_sd.data.imageset import load_image_set
from amnesia_sd.data.prompts import bundled, read_prompts
from helpers import unet_weights

QUICK = {"num_inference_steps": 2, "batch_size": 4}
TEMPLATES = read_prompts(bundled("concept_templates.txt"))
# spread() over "man" and "woman" through every template: 4 images, evenly over the 2 x 34 prompts
EXPECTED = [TEMPLATES[0].format("man"), TEMPLATES[17].format("man"), TEMPLATES[0].format("woman"),
            TEMPLATES[17].format("woman")]


def given_sets(model, root: Path) -> dict:
    """A 4-image replay set, its Fisher (4 timesteps) and a 2-image surrogate set of `model`."""
    replay = make_image_set(SetConfig(model=str(model), output_dir=str(root / "replay"), kind="replay",
                                      prompts=["a photo of a dog", "a house"], num_images=4, **QUICK)).path
    surrogate = make_image_set(SetConfig(model=str(model), output_dir=str(root / "surrogate"), kind="surrogate",
                                         prompts=["a middle aged man"], num_images=2, **QUICK)).path
    fim = compute_fim(FimConfig(model=str(model), output=str(root / "fim.safetensors"), replay_dir=str(replay),
                                num_timesteps=4, timestep_batch_size=4))
    return {"replay_dir": str(replay), "surrogate_dir": str(surrogate), "fim": str(fim)}


@pytest.fixture(scope="module")
def sets(tiny_model, tmp_path_factory, isolated_cache):
    return given_sets(tiny_model, tmp_path_factory.mktemp("preserve-sets"))


def run(base, sets, out, **overrides):
    settings = {"model": str(base), "concept": "brad pitt", "output_dir": str(out), "train_batch_size": 2,
                "max_train_steps": 3, "learning_rate": 1e-3, **QUICK, **sets, **overrides}
    return forget(ForgetConfig(**settings))


def spy_training(monkeypatch) -> list[dict]:
    """Records, per run, the replay pool the trainer gets and every replay index drawn from it."""
    seen, real_conditioning, real_draw = [], forget_module.conditioning, forget_module.draw_batch

    def conditioning(run, sets):
        data = real_conditioning(run, sets)
        seen.append({"data": data, "replay": len(sets.replay.latents), "drawn": []})
        return data

    def draw_batch(*args, **kwargs):
        drawn = real_draw(*args, **kwargs)
        seen[-1]["pool"] = args[7]
        seen[-1]["drawn"] += drawn["replay_index"].tolist()
        return drawn

    monkeypatch.setattr(forget_module, "conditioning", conditioning)
    monkeypatch.setattr(forget_module, "draw_batch", draw_batch)
    return seen


def test_preserve_set_is_drawn_by_the_base_cached_replayed_and_recorded(tiny_model, sets, tmp_path, monkeypatch,
                                                                        capsys, isolated_cache):
    seen = spy_training(monkeypatch)
    out = run(tiny_model, sets, tmp_path / "kept", preserve="man, woman", preserve_images=4)
    said = capsys.readouterr().out
    assert "preserve set (4 images x 2 steps): 16 passes" in said  # in the cost line, before any work
    record = json.loads((out / "amnesia.json").read_text())
    preserve = record["preserve"]
    assert {k: preserve[k] for k in ("value", "names", "prompts", "images", "earlier_run")} == {
        "value": "man, woman", "names": ["man", "woman"], "prompts": EXPECTED, "images": 4, "earlier_run": False}
    # Made by the base model, in its cache entry (--replay-dir and --fim given or not), not in the result.
    made = load_image_set(preserve["set"])
    assert Path(preserve["set"]).name.startswith("preserve-") and isolated_cache in Path(preserve["set"]).parents
    assert made.prompts == EXPECTED and len(list((made.path / "images").glob("*.png"))) == 4
    assert made.manifest["kind"] == "preserve" and made.manifest["base_model"] == record["base_model"]
    assert made.manifest["seed_stream"] == "preserve"  # not the replay images' noise
    # The trainer's replay pool is the replay set, then the preserve set, each image with its own prompt.
    data, replay = seen[0]["data"], load_image_set(sets["replay_dir"])
    assert seen[0]["pool"] == len(data.replay_latents) == 4 + 4
    assert torch.equal(data.replay_latents, torch.cat([replay.latents, made.latents]))
    texts = sorted(set(replay.prompts + EXPECTED))
    assert [texts[i] for i in data.replay_text_index] == replay.prompts + EXPECTED
    assert any(i >= 4 for i in seen[0]["drawn"])  # preserve images are drawn in replay batches
    assert "neighbours held in the replay (--preserve): man, woman (4 images" in (out / "README.md").read_text()

    # The same run without --preserve trains otherwise: the neighbours change the result.
    plain = run(tiny_model, sets, tmp_path / "plain")
    assert seen[1]["pool"] == 4 and json.loads((plain / "amnesia.json").read_text())["preserve"] is None
    a, b = unet_weights(out), unet_weights(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # A rerun reuses the cached set: no image is made again.
    stamps = {p: p.stat().st_mtime_ns for p in made.path.rglob("*")}
    again = run(tiny_model, sets, tmp_path / "again", preserve="man, woman", preserve_images=4)
    assert "preserve set (4 images x 2 steps): cached" in capsys.readouterr().out
    assert json.loads((again / "amnesia.json").read_text())["preserve"]["set"] == preserve["set"]
    assert {p: p.stat().st_mtime_ns for p in made.path.rglob("*")} == stamps
    b = unet_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same set, the same training


def test_bare_names_and_the_default_size(tiny_model, sets, tmp_path):
    """--no-templates: the names bare (the digits demo's form); 50 images spread over them by default."""
    out = run(tiny_model, sets, tmp_path / "bare", preserve="man, a dog", templates=False, max_train_steps=1,
              num_inference_steps=1)
    preserve = json.loads((out / "amnesia.json").read_text())["preserve"]
    assert preserve["prompts"] == ["man", "a dog"] and preserve["images"] == 50
    assert load_image_set(preserve["set"]).prompts == ["man", "a dog"] * 25


def test_a_later_run_replays_the_earlier_preserve_set_unless_it_forgets_a_neighbour(tiny_model, sets, tmp_path,
                                                                                    capsys):
    first = run(tiny_model, sets, tmp_path / "first", preserve="man, woman", preserve_images=4, max_train_steps=1)
    earlier = json.loads((first / "amnesia.json").read_text())["preserve"]
    second = run(tiny_model, {"fim": sets["fim"], "replay_dir": sets["replay_dir"]}, tmp_path / "second",
                 model=str(first), concept="a cat", surrogate="a dog", num_surrogate_images=2, max_train_steps=1)
    kept = json.loads((second / "amnesia.json").read_text())["preserve"]
    assert kept == {**earlier, "earlier_run": True}  # the same set, as the replay set is passed on
    assert "preserve set of the earlier run (4 images): cached" in capsys.readouterr().out
    # A later run that forgets one of the neighbours does not replay them, and says so.
    third = run(tiny_model, sets, tmp_path / "third", model=str(first), concept="woman", max_train_steps=1)
    assert "holds 'woman', which this run forgets: it is not replayed" in capsys.readouterr().out
    assert json.loads((third / "amnesia.json").read_text())["preserve"] is None


def test_a_resumed_run_with_preserve_equals_an_uninterrupted_one(tiny_model, sets, tmp_path, monkeypatch):
    settings = {"preserve": "man, woman", "preserve_images": 4, "max_train_steps": 4, "checkpointing_steps": 2}
    straight = run(tiny_model, sets, tmp_path / "straight", **settings)
    real_save = forget_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(forget_module, "save_checkpoint", save_then_crash)
        with pytest.raises(Interrupted):
            run(tiny_model, sets, tmp_path / "resumed", **settings)
    resumed = run(tiny_model, sets, tmp_path / "resumed", **settings, resume_from_checkpoint="latest")
    a, b = unet_weights(straight), unet_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_lora_run_with_preserve(tiny_model, sets, tmp_path, monkeypatch):
    seen = spy_training(monkeypatch)
    out = run(tiny_model, sets, tmp_path / "lora", preserve="man", preserve_images=2, lora_rank=2, max_train_steps=2)
    record = json.loads((out / "amnesia.json").read_text())
    assert record["lora"]["rank"] == 2 and record["preserve"]["images"] == 2
    assert seen[0]["pool"] == 4 + 2 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_the_preserve_set_is_drawn_at_the_given_replay_sets_size(tiny_model, sets, tmp_path):
    """Its images join the replay pool, so they are drawn at the replay set's size, not --resolution's."""
    replay = make_image_set(SetConfig(model=str(tiny_model), output_dir=str(tmp_path / "replay-24"), kind="replay",
                                      prompts=["a house"], num_images=2, resolution=24, **QUICK)).path
    out = run(tiny_model, {**sets, "replay_dir": str(replay)}, tmp_path / "out", preserve="man", preserve_images=2,
              max_train_steps=1)
    made = load_image_set(json.loads((out / "amnesia.json").read_text())["preserve"]["set"])
    assert made.manifest["resolution"] == 24 and made.latents.shape[-2:] == (12, 12)


def test_sdxl_preserve_images_keep_their_micro_conditioning(tiny_sdxl_model, tmp_path, monkeypatch, isolated_cache):
    sets = given_sets(tiny_sdxl_model, tmp_path)
    seen = spy_training(monkeypatch)
    out = run(tiny_sdxl_model, sets, tmp_path / "xl", preserve="man, woman", preserve_images=2, templates=False,
              max_train_steps=2)
    record = json.loads((out / "amnesia.json").read_text())
    assert record["architecture"] == "sdxl" and record["preserve"]["prompts"] == ["man", "woman"]
    made, replay = load_image_set(record["preserve"]["set"]), load_image_set(sets["replay_dir"])
    data = seen[0]["data"]
    assert seen[0]["pool"] == 4 + 2 and set(data.images["replay"]) == {"time_ids"}
    assert torch.equal(data.images["replay"]["time_ids"],
                       torch.cat([replay.conditioning["time_ids"], made.conditioning["time_ids"]]))


def test_preserve_settings_come_from_a_config_file(tmp_path):
    file = tmp_path / "forget.yaml"
    file.write_text("preserve: celebrities\npreserve-images: 20\n")
    config = build_config(ForgetConfig, str(file), {"model": "m", "output_dir": "o", "concept": ["brad pitt"],
                                                    "surrogate": ["a man"]})
    assert (config.preserve, config.preserve_images) == ("celebrities", 20)


@pytest.mark.parametrize("flags, message", [
    (["--preserve", "Tom Cruise, Brad Pitt"], "--preserve names 'Brad Pitt', which is the concept being forgotten"),
    (["--preserve", " , "], "--preserve is empty"),
    (["--preserve", ""], "--preserve is empty"),
    (["--preserve", "man", "--preserve-images", "0"], "--preserve-images must be positive, got 0"),
    (["--preserve-images", "4"], "--preserve-images sizes the set of the neighbours --preserve names"),
])
def test_bad_preserve_values_are_refused_before_any_work(tiny_model, sets, tmp_path, isolated_cache, flags, message):
    before = sorted(isolated_cache.rglob("*"))
    result = CliRunner().invoke(app, ["forget", "--model", str(tiny_model), "--concept", "brad pitt", "--surrogate",
                                      "a man", "--replay-dir", sets["replay_dir"], "--fim", sets["fim"],
                                      "--output-dir", str(tmp_path / "out"), *flags])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert sorted(isolated_cache.rglob("*")) == before
