"""forget --adversarial on the tiny model: the inner attack's rounds, what it records and saves,
resume, the draw of adversary prompts, and bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from amnesia_sd.commands.forget import draw_batch
from amnesia_sd.core.config import ForgetConfig
from amnesia_sd.core.errors import UserError
from amnesia_sd.data.imageset import load_image_set
from amnesia_sd.data.prompts import bundled, read_prompts
from amnesia_sd.method.adversary import TOKEN
from amnesia_sd.method.textual_inversion import token_rows
from helpers import uniform_timesteps, unet_weights
from test_careless import refuses
from test_forget import data, killed_after_first_checkpoint, run, skip_optimizer_steps  # noqa: F401 (data: a fixture)

ADVERSARIAL = {"adversarial": True, "adversarial_every": 2, "adversarial_steps": 2, "adversarial_images": 3,
               "adversarial_initializer": "man", "adversarial_batch_size": 2, "max_train_steps": 4,
               "num_inference_steps": 2}


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_adversarial_run_records_its_rounds_and_keeps_the_text_encoder(tiny_model, data, tmp_path):
    before = hashes(Path(tiny_model))
    out = run(tiny_model, data, tmp_path / "adv", **ADVERSARIAL)
    assert hashes(Path(tiny_model)) == before  # the base model is read, never written
    record = json.loads((out / "amnesia.json").read_text())
    adv = record["adversarial"]
    assert [r["step"] for r in adv["rounds"]] == [0, 2]  # before step 1, then every 2 steps
    assert all(r["loss_first"] > 0 and r["loss_last"] > 0 for r in adv["rounds"])
    assert adv["token"] == TOKEN and adv["prompts"] == [t.format(TOKEN) for t in
                                                       read_prompts(bundled("concept_templates.txt"))]
    assert adv["concept_set"] == "data/concept" and adv["embedding"] == "adversary_embeds.safetensors"
    concept = load_image_set(out / "data" / "concept")
    assert len(concept.latents) == 3 and all("brad pitt" in p for p in concept.prompts)
    assert record["settings"]["adversarial"] is True and record["settings"]["adversarial_share"] == 0.5

    # The result's text encoder and tokenizer are those of a run without the adversary (the base
    # model's): the token lives in the adversary's copy. Its last row loads onto the result in
    # plain diffusers.
    plain = run(tiny_model, data, tmp_path / "plain", **{**ADVERSARIAL, "adversarial": False})
    for part in ("text_encoder", "tokenizer"):
        assert hashes(out / part) == hashes(plain / part)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    rows = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(out / "adversary_embeds.safetensors"), token=TOKEN)
    saved = load_file(out / "adversary_embeds.safetensors")[TOKEN][0]
    assert len(pipe.tokenizer) == rows + 1
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-1], saved)

    # The adversary changed the training: same settings without it give other weights.
    a, b = unet_weights(out), unet_weights(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "adversarial" not in json.loads((plain / "amnesia.json").read_text())


def test_a_step_skipped_by_fp16_does_not_repeat_the_adversarys_round(tiny_model, data, tmp_path, monkeypatch):
    skip_optimizer_steps(monkeypatch, {1})  # fp16's first steps typically overflow
    out = run(tiny_model, data, tmp_path / "adv", **{**ADVERSARIAL, "max_train_steps": 2})
    record = json.loads((out / "amnesia.json").read_text())
    assert record["steps"] == 2 and record["skipped_steps"] == 1
    assert [r["step"] for r in record["adversarial"]["rounds"]] == [0]  # one round before step 1, not one per try


def test_adversarial_resumed_run_equals_uninterrupted_run(tiny_model, data, tmp_path, monkeypatch):
    settings = {**ADVERSARIAL, "adversarial_every": 3, "checkpointing_steps": 2}  # rounds at 0 and 3: one after resume
    straight = run(tiny_model, data, tmp_path / "straight", **settings)
    killed_after_first_checkpoint(monkeypatch, tiny_model, data, tmp_path / "resumed", **settings)
    resumed = run(tiny_model, data, tmp_path / "resumed", resume_from_checkpoint="latest", **settings)
    a, b = unet_weights(straight), unet_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    rounds = [json.loads((r / "amnesia.json").read_text())["adversarial"]["rounds"] for r in (straight, resumed)]
    assert [r["step"] for r in rounds[1]] == [0, 3]
    for x, y in zip(*rounds):
        assert x["step"] == y["step"] and x["loss_last"] == pytest.approx(y["loss_last"], rel=1e-5)
    torch.testing.assert_close(load_file(straight / "adversary_embeds.safetensors")[TOKEN],
                               load_file(resumed / "adversary_embeds.safetensors")[TOKEN], rtol=1e-5, atol=1e-7)


def test_adversary_prompts_replace_a_share_of_the_adversarial_pairs_samples_only():
    shapes = {"surrogate": (4, 2, 2), "replay": (4, 2, 2)}
    args = (7, 3, 1, 0, 3000, [(0, 10), (10, 10)], [(0, 5), (5, 4)], 20, shapes, uniform_timesteps)
    plain = draw_batch(*args)
    drawn = draw_batch(*args, adversarial=((5, 4), 6, 0.5))
    for key, value in plain.items():  # every other draw is the same
        assert torch.equal(value, drawn[key]), key
    index, concept = drawn["adversarial_index"], drawn["concept_index"]
    assert len(index) == 3000
    ours = (concept >= 5) & (concept < 9)
    assert (index[~ours] == -1).all()  # the earlier pair's samples keep their prompts
    share = (index[ours] >= 0).float().mean().item()
    assert abs(share - 0.5) < 0.05 and set(index[index >= 0].tolist()) == set(range(6))


def test_bad_adversarial_input_gives_one_line(tiny_model, data, tmp_path):
    common = ["--model", str(tiny_model), "--replay-dir", data["replay_dir"], "--fim", data["fim"],
              "--surrogate-dir", data["surrogate_dir"], "--output-dir", str(tmp_path / "out"), "--adversarial"]
    refuses(["forget", *common, "--concept", "a", "--concept", "b"], "--adversarial learns one token for one concept")
    refuses(["forget", *common, "--concept", "a", "--adversarial-share", "0"], "--adversarial-share must be in (0, 1]")
    refuses(["forget", *common, "--concept", "a", "--adversarial-every", "0"], "--adversarial-every must be positive")
    refuses(["forget", *common, "--concept", "a", "--adversarial-initializer", "middle aged"],
            "--adversarial-initializer 'middle aged' is 2 tokens")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of the concept\n")
    refuses(["forget", *common, "--concept", "a", "--adversarial-templates", str(templates)],
            "--adversarial-templates: every line needs exactly one {}")
    refuses(["forget", *common, "--concept", "a", "--adversarial-templates", str(tmp_path / "missing.txt")],
            f"--adversarial-templates: prompts file {tmp_path / 'missing.txt'} not found")
    assert not (tmp_path / "out").exists()
    assert ForgetConfig(model="m", output_dir="o", concept="c", surrogate="s").adversarial is False


def test_sdxl_adversarial_run_learns_a_row_in_each_text_encoder(tiny_sdxl_model, tmp_path):
    out = run(tiny_sdxl_model, {}, tmp_path / "xl", surrogate="a man", num_replay_images=2, num_surrogate_images=2,
              **{**ADVERSARIAL, "max_train_steps": 2, "adversarial_images": 2})
    record = json.loads((out / "amnesia.json").read_text())
    assert record["architecture"] == "sdxl" and [r["step"] for r in record["adversarial"]["rounds"]] == [0]
    embeds = load_file(out / "adversary_embeds.safetensors")
    widths = [json.loads((out / enc / "config.json").read_text())["hidden_size"]
              for enc in ("text_encoder", "text_encoder_2")]
    assert [tuple(embeds[k].shape) for k in ("clip_l", "clip_g")] == [(1, widths[0]), (1, widths[1])]
    assert all(torch.isfinite(v).all() for v in embeds.values())
    # In plain diffusers: one load_textual_inversion per text encoder, the rows as saved.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(embeds[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row, embeds[key][0])


def test_a_non_finite_adversary_token_is_never_finished(tiny_model, data, tmp_path, monkeypatch):
    from amnesia_sd.method import adversary as adversarial

    def inf_rows(family, text, *args, **kwargs):
        return [torch.full_like(row, float("inf")) for row in token_rows(text, family, args[2])], [1.0], {}

    monkeypatch.setattr(adversarial, "learn_token", inf_rows)
    # A share so small that no sample uses the token: the loss stays finite, the token does not.
    with pytest.raises(UserError, match="the adversary's token is non-finite"):
        run(tiny_model, data, tmp_path / "out", **ADVERSARIAL, adversarial_share=1e-9)
    assert not (tmp_path / "out").exists()
