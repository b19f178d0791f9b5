"""--unconditional-replay: the replay set also holds the model's samples of the empty prompt, which
keep the unconditional prediction (what classifier-free guidance steers from) near the base model's."""

import json
from pathlib import Path

import pytest
import torch

from amnesia_sd.commands.forget import forget
from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import ForgetConfig, SetConfig
from amnesia_sd.core.errors import UserError
from amnesia_sd.data.imageset import load_image_set
from helpers import load_parts, run_command

QUICK = {"num_inference_steps": 2, "batch_size": 4}


def test_replay_command_appends_samples_of_the_empty_prompt(tiny_model, tmp_path):
    (tmp_path / "prompts.txt").write_text("a dog\na cat\n")
    run_command("replay", "--model", str(tiny_model), "--output-dir", "r", "--prompts", "prompts.txt",
                "--num-images", "4", "--unconditional-replay", "0.5", "--num-inference-steps", "2", cwd=tmp_path)
    made = load_image_set(tmp_path / "r")
    assert made.prompts == ["a dog", "a cat", "a dog", "a cat", "", ""] and len(made.latents) == 6
    assert sorted(p.name for p in (tmp_path / "r" / "images").iterdir())[-1] == "000005.png"
    # the empty prompt's images are the model's unconditional samples, not copies of the others
    assert not torch.allclose(made.latents[4], made.latents[0])
    with pytest.raises(UserError, match="--unconditional-replay is for replay sets"):
        SetConfig(model="m", output_dir="o", prompts=["a man"], kind="surrogate", unconditional_replay=0.1)
    run_command("replay", "--model", str(tiny_model), "--output-dir", "bad", "--prompts", "prompts.txt",
                "--unconditional-replay", "-0.1", cwd=tmp_path, code=2)
    assert not (tmp_path / "bad").exists()


def unconditional_drift(base, model, latents: torch.Tensor) -> float:
    """Mean squared difference of two models' predictions for the empty prompt on the same noisy latents."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 400, 700, 950] * (len(latents) // 4 + 1))[: len(latents)]
    outputs = []
    for folder in (base, model):
        pipe, scheduler = load_parts(folder)
        empty = pipe.encode_prompt("", "cpu", 1, False)[0].expand(len(latents), -1, -1)
        with torch.no_grad():
            outputs.append(pipe.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=empty).sample)
    return (outputs[0] - outputs[1]).pow(2).mean().item()


def test_unconditional_replay_holds_the_unconditional_prediction(tiny_model, tmp_path):
    """The surrogate term moves the whole UNet, the empty prompt's prediction with it; replaying the
    model's unconditional samples pulls that prediction back. Same seeds, same prompted replay
    images: only the empty-prompt images differ."""
    sets = {}
    for share in (0.0, 1.0):
        sets[share] = make_image_set(SetConfig(
            model=str(tiny_model), output_dir=str(tmp_path / f"replay-{share:g}"), kind="replay",
            prompts=["a photo of a dog", "a house", "a red car", "a tree"], num_images=8,
            unconditional_replay=share, **QUICK))
    assert torch.equal(sets[1.0].latents[:8], sets[0.0].latents)
    drift = {}
    for share, image_set in sets.items():
        out = forget(ForgetConfig(model=str(tiny_model), output_dir=str(tmp_path / f"forgot-{share:g}"),
                                  concept="brad pitt", surrogate="a man", num_surrogate_images=4,
                                  replay_dir=str(image_set.path), fim_num_timesteps=2, lambda_ewc=0.0,
                                  train_batch_size=4, max_train_steps=100, learning_rate=1e-3, seed=0, **QUICK))
        drift[share] = unconditional_drift(tiny_model, out, sets[1.0].latents[8:])
    assert drift[1.0] < 0.8 * drift[0.0], drift  # 0.64-0.68 of it at seeds 0, 1, 2


def test_a_sequence_reuses_the_replay_set_unless_another_share_is_asked_for(tiny_model, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prompts.txt").write_text("a dog\na cat\n")
    common = {"surrogate": "a man", "num_surrogate_images": 2, "fim_num_timesteps": 2, "train_batch_size": 2,
              "max_train_steps": 2, **QUICK}
    first = forget(ForgetConfig(model=str(tiny_model), output_dir=str(tmp_path / "first"), concept="brad pitt",
                                prompts_file=str(tmp_path / "prompts.txt"), num_replay_images=4,
                                unconditional_replay=0.5, **common))
    replay = json.loads((first / "amnesia.json").read_text())["replay_set"]
    assert load_image_set(replay).prompts == ["a dog", "a cat", "a dog", "a cat", "", ""]
    assert json.loads((first / "amnesia.json").read_text())["replay_images"] == {"prompted": 4, "unconditional": 2}
    assert "- replay set: 4 prompted images, 2 of the empty prompt" in (first / "README.md").read_text()

    def next_run(name: str, **flags) -> dict:
        out = forget(ForgetConfig(model=str(first), output_dir=str(tmp_path / name), **{**common, **flags}))
        return json.loads((out / "amnesia.json").read_text())

    # Without the flag, or with the share the set holds, the earlier run's set is reused as it is.
    for name, flags in (("same", {}), ("given", {"unconditional_replay": 0.5})):
        record = next_run(name, concept="tom cruise", **flags)
        assert record["settings"]["replay_dir"] == replay and record["settings"]["unconditional_replay"] is None
    capsys.readouterr()
    # Another share: a new set (of the bundled prompts, 100 instead of 1000 here), made on the model
    # being trained, as the run says.
    monkeypatch.setattr("amnesia_sd.method.sources.DEFAULT_REPLAY_IMAGES", 100)
    record = next_run("other", concept="a cat", unconditional_replay=0.01, batch_size=100)
    assert "does not hold --unconditional-replay 0.01: a new one is made on" in capsys.readouterr().out
    made = load_image_set(record["replay_set"])
    assert Path(record["replay_set"]) != Path(replay) and made.prompts[-1:] == [""] and len(made.prompts) == 101
    assert made.manifest["base_model"] == record["base_model"]
