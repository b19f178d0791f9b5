"""Forgetting on the tiny model through the library: what trains, resume, EMA, NaN, sets."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from amnesia_sd.commands import forget as forget_module
from amnesia_sd.commands.fim import compute_fim
from amnesia_sd.commands.forget import forget
from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import FimConfig, ForgetConfig, SetConfig
from amnesia_sd.core.errors import Interrupted, UserError
from amnesia_sd.data.imageset import load_image_set
from amnesia_sd.model.trainable import trainable_names
from helpers import load_parts, unet_weights

QUICK = {"num_inference_steps": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    replay = make_image_set(SetConfig(model=str(tiny_model), output_dir=str(root / "replay"), kind="replay",
                                      prompts=["a photo of a dog", "a cat in a tree", "a house", "a woman"],
                                      num_images=6, **QUICK)).path
    surrogate = make_image_set(SetConfig(model=str(tiny_model), output_dir=str(root / "surrogate"),
                                         kind="surrogate", prompts=["a middle aged man"], num_images=4, **QUICK)).path
    fim = compute_fim(FimConfig(model=str(tiny_model), output=str(root / "fim.safetensors"),
                                replay_dir=str(replay), num_timesteps=10, timestep_batch_size=10))
    return {"replay_dir": str(replay), "surrogate_dir": str(surrogate), "fim": str(fim)}


def run(tiny_model, data, out, **overrides):
    settings = {"model": str(tiny_model), "concept": "brad pitt", "output_dir": str(out), "train_batch_size": 2,
                "max_train_steps": 3, "learning_rate": 1e-3, **data, **overrides}
    return forget(ForgetConfig(**settings))


def killed_after_first_checkpoint(monkeypatch, tiny_model, data, out, **settings):
    """Run until the first checkpoint is saved, then stop as if the job were killed right after it."""
    real_save = forget_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(forget_module, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(Interrupted) as stopped:
            run(tiny_model, data, out, **settings)
    finally:
        monkeypatch.setattr(forget_module, "save_checkpoint", real_save)
    return str(stopped.value)


def test_image_sets_have_the_documented_format(data):
    replay = load_image_set(data["replay_dir"])
    assert replay.latents.shape == (6, 4, 8, 8) and replay.latents.dtype == torch.float32
    assert replay.prompts[4] == "a photo of a dog"  # prompts repeat when more images are asked for
    assert replay.manifest["kind"] == "replay" and replay.manifest["num_images"] == 6
    assert len(list((replay.path / "images").glob("*.png"))) == 6


@pytest.mark.parametrize("method", ["full", "noxattn", "xattn"])
def test_each_train_method_changes_exactly_its_parameters(tiny_model, data, tmp_path, method):
    out = run(tiny_model, data, tmp_path / method, train_method=method, max_train_steps=1)
    before, after = unet_weights(tiny_model), unet_weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    intended = set(trainable_names(load_parts(tiny_model)[0].unet, method))
    assert changed == intended
    record = json.loads((out / "amnesia.json").read_text())
    assert record["steps"] == 1 and record["skipped_steps"] == 0 and record["settings"]["train_method"] == method
    assert set(record["final_losses"]) == {"surrogate", "replay", "ewc", "total"}


def test_resumed_run_equals_uninterrupted_run(tiny_model, data, tmp_path, monkeypatch):
    straight = run(tiny_model, data, tmp_path / "straight", max_train_steps=4, checkpointing_steps=2)

    message = killed_after_first_checkpoint(monkeypatch, tiny_model, data, tmp_path / "resumed", max_train_steps=4,
                                            checkpointing_steps=2)
    assert re.search("rerun with --resume-from-checkpoint latest to continue from .*checkpoint-2", message)
    # The run works in resumed.partial; nothing at the output path looks finished.
    assert (tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(UserError, match="resume-from-checkpoint latest"):
        run(tiny_model, data, tmp_path / "resumed", max_train_steps=4, checkpointing_steps=2)

    resumed = run(tiny_model, data, tmp_path / "resumed", max_train_steps=4, checkpointing_steps=2,
                  resume_from_checkpoint="latest")
    assert json.loads((resumed / "amnesia.json").read_text())["steps"] == 4
    a, b = unet_weights(straight), unet_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert not (resumed / "checkpoints").exists() and not (tmp_path / "resumed.partial").exists()


def test_ema_weights_are_what_is_saved(tiny_model, data, tmp_path):
    raw = unet_weights(run(tiny_model, data, tmp_path / "raw"))
    ema = unet_weights(run(tiny_model, data, tmp_path / "ema", ema_decay=0.5))
    base = unet_weights(tiny_model)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    assert not torch.equal(ema[key], raw[key])
    # An average of the trajectory lies closer to the start than its end does.
    assert (ema[key] - base[key]).norm() < (raw[key] - base[key]).norm()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    out = tmp_path / "nan"
    real_loss, calls = forget_module.per_sample_loss, []

    def nan_on_second_step(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(forget_module, "per_sample_loss", nan_on_second_step)
    with pytest.raises(UserError, match="the loss became nan at step 2.*checkpoint-1"):
        run(tiny_model, data, out, checkpointing_steps=1)
    kept = tmp_path / "nan.partial" / "checkpoints" / "checkpoint-1"
    weights = load_file(str(kept / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not out.exists()  # nothing looks finished
    # Following the message's advice works: the run resumes from the good checkpoint and finishes.
    monkeypatch.setattr(forget_module, "per_sample_loss", real_loss)
    run(tiny_model, data, out, checkpointing_steps=1, resume_from_checkpoint="latest")
    assert json.loads((out / "amnesia.json").read_text())["steps"] == 3
    assert all(torch.isfinite(w).all() for w in unet_weights(out).values())


def exploding_optimizer(monkeypatch):
    """AdamW whose step leaves an infinite weight behind (learning rates that large are refused now)."""
    real = torch.optim.AdamW.step

    def step(self, closure=None):
        real(self, closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_exploding_weights_are_never_checkpointed_nor_finished(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "boom"
    exploding_optimizer(monkeypatch)
    with pytest.raises(UserError, match="the weights became non-finite .* at step 1.*No checkpoint was saved yet"):
        run(tiny_model, data, out, checkpointing_steps=1, lambda_ewc=0.0)
    assert not list((tmp_path / "boom.partial").glob("checkpoints/checkpoint-*")) and not out.exists()


def test_finished_result_is_not_overwritten_without_flag(tiny_model, data, tmp_path, monkeypatch):
    out = run(tiny_model, data, tmp_path / "done", max_train_steps=1)
    stamp, weights = (out / "amnesia.json").read_text(), unet_weights(out)
    with pytest.raises(UserError, match="already holds a finished forgotten model; pass --overwrite"):
        run(tiny_model, data, out, max_train_steps=1)
    assert (out / "amnesia.json").read_text() == stamp
    # A failed --overwrite leaves the old result whole: it is replaced only by a complete new one.
    with monkeypatch.context() as patch:
        exploding_optimizer(patch)
        with pytest.raises(UserError, match="training stopped and nothing was written as finished"):
            run(tiny_model, data, out, lambda_ewc=0.0, overwrite=True)
    assert (out / "amnesia.json").read_text() == stamp
    assert all(torch.equal(weights[k], v) for k, v in unet_weights(out).items())
    run(tiny_model, data, out, max_train_steps=2, overwrite=True)
    assert json.loads((out / "amnesia.json").read_text())["steps"] == 2
    assert not (tmp_path / "done.partial").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["done"]


def test_generated_replay_and_own_surrogate_images(tiny_model, data, tmp_path):
    from PIL import Image

    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (80 * i, 30, 90)).save(mine / f"{i}.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\na cat\n")
    out = run(tiny_model, {"fim": data["fim"]}, tmp_path / "out", surrogate_images=str(mine),
              prompts_file=str(prompts), num_replay_images=3, num_inference_steps=2, max_train_steps=1)
    record = json.loads((out / "amnesia.json").read_text())
    replay = load_image_set(record["replay_set"])  # made once for this base model, in the cache
    assert replay.prompts == ["a dog", "a cat", "a dog"]
    assert Path(os.environ["AMNESIA_SD_CACHE"]) in Path(record["replay_set"]).parents
    assert record["surrogate_set"] == "data/surrogate"  # inside the result, recorded relative to it
    assert load_image_set(out / "data" / "surrogate").manifest["source"] == "images"
    assert record["steps"] == 1


def test_gradient_checkpointing_gives_the_same_step(tiny_model, data, tmp_path):
    plain = unet_weights(run(tiny_model, data, tmp_path / "plain", max_train_steps=2))
    ckpt = unet_weights(run(tiny_model, data, tmp_path / "ckpt", max_train_steps=2, gradient_checkpointing=True))
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-5, atol=1e-6)


def test_sets_made_by_forget_are_sampled_in_its_mixed_precision(tiny_model, data, tmp_path, monkeypatch):
    """forget holds the pipeline in float32 (master weights): its surrogate set is sampled under the
    run's autocast (bf16 here; on a GPU, the default), the VAE's decode in the VAE's own dtype."""
    from amnesia_sd.data import generate as generate_module

    seen, real = [], generate_module.decode
    monkeypatch.setattr(generate_module, "decode", lambda vae, latents: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))) or real(vae, latents))
    given = {k: v for k, v in data.items() if k != "surrogate_dir"}
    run(tiny_model, given, tmp_path / "o", surrogate="a man", num_surrogate_images=2, num_inference_steps=2,
        mixed_precision="bf16", max_train_steps=1)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)


def test_bf16_mixed_precision_trains(tiny_model, data, tmp_path):
    out = run(tiny_model, data, tmp_path / "bf16", mixed_precision="bf16", max_train_steps=2)
    weights = unet_weights(out)
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights are saved
    losses = json.loads((out / "amnesia.json").read_text())["final_losses"]
    assert all(v == v and abs(v) < 1e3 for v in losses.values())


def test_lora_under_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(tiny_model, data, tmp_path,
                                                                                monkeypatch):
    from safetensors.torch import load_file

    seen, real = {}, forget_module.preflight

    def spy(unet, trainable, *args):  # what the run holds as training starts
        seen["frozen"] = {p.dtype for p in unet.parameters() if not p.requires_grad}
        seen["trained"] = {p.dtype for p in trainable.params}
        return real(unet, trainable, *args)

    monkeypatch.setattr(forget_module, "preflight", spy)
    out = run(tiny_model, data, tmp_path / "lora-bf16", mixed_precision="bf16", lora_rank=2, max_train_steps=2)
    assert seen == {"frozen": {torch.bfloat16}, "trained": {torch.float32}}
    adapters = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert adapters and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in adapters.values())


def test_fim_generates_its_replay_set_when_none_is_given(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\na house\n")
    fim = compute_fim(FimConfig(model=str(tiny_model), output=str(tmp_path / "f.safetensors"),
                                prompts_file=str(prompts), num_images=3, num_timesteps=4, num_inference_steps=2))
    replay = load_image_set(tmp_path / "f-replay")
    assert len(replay.latents) == 3
    from safetensors import safe_open

    with safe_open(str(fim), "pt") as f:
        assert f.metadata()["num_samples"] == "3" and f.metadata()["replay_set"].endswith("f-replay")


def test_text_encoder_runs_before_training_only(tiny_model, data, tmp_path, monkeypatch):
    from amnesia_sd.model.families import StableDiffusion

    calls = []
    real = StableDiffusion.encode_text
    monkeypatch.setattr(StableDiffusion, "encode_text", lambda self, *a: calls.append(1) or real(self, *a))
    run(tiny_model, data, tmp_path / "one", max_train_steps=1)
    one = len(calls)
    run(tiny_model, data, tmp_path / "five", max_train_steps=5)
    assert len(calls) - one == one  # five steps encode exactly what one step did: all up front


def test_fisher_and_anchor_in_bf16(tiny_model, data, tmp_path):
    full = unet_weights(run(tiny_model, data, tmp_path / "fp32", max_train_steps=2))
    half = unet_weights(run(tiny_model, data, tmp_path / "bf16", max_train_steps=2, fim_dtype="bf16"))
    base = unet_weights(tiny_model)
    flat = lambda w: torch.cat([v.flatten() for v in w.values()])  # noqa: E731
    # The same training, up to the pull towards bf16-rounded anchors (at most bf16's rounding).
    assert (flat(half) - flat(full)).norm() < 0.5 * (flat(full) - flat(base)).norm()
    assert torch.isfinite(flat(half)).all()


def test_resume_with_other_settings_is_refused_listing_them(tiny_model, data, tmp_path, monkeypatch):
    killed_after_first_checkpoint(monkeypatch, tiny_model, data, tmp_path / "o", max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(UserError, match=r"other settings \(learning_rate: 0.001 -> 0.01; train_method: 'full' -> 'xattn'\)"):
        run(tiny_model, data, tmp_path / "o", max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2,
            train_method="xattn", resume_from_checkpoint="latest")
    # What may change: the steps to run and the checkpoint cadence.
    out = run(tiny_model, data, tmp_path / "o", max_train_steps=5, checkpointing_steps=3,
              resume_from_checkpoint="latest")
    record = json.loads((out / "amnesia.json").read_text())
    assert record["steps"] == 5 and record["learning_rate"] == 1e-3


def test_foreign_fisher_is_used_only_when_allowed_and_then_recorded(tiny_model, data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(data["fim"], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {**f.metadata(), "base_model": "hub:someone/else"}
    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata=meta)
    settings = {**data, "fim": str(tmp_path / "foreign.safetensors")}
    with pytest.raises(UserError, match="base_model 'hub:someone/else', this model"):
        run(tiny_model, settings, tmp_path / "o", max_train_steps=1)
    out = run(tiny_model, settings, tmp_path / "o", max_train_steps=1, allow_origin_mismatch=True)
    record = json.loads((out / "amnesia.json").read_text())
    assert len(record["origin_mismatches"]) == 1 and "hub:someone/else" in record["origin_mismatches"][0]
    assert record["settings"]["allow_origin_mismatch"] is True


def test_unset_mixed_precision_follows_the_accelerate_config(tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config
    record = json.loads((run(tiny_model, data, tmp_path / "o", max_train_steps=1) / "amnesia.json").read_text())
    assert record["settings"]["mixed_precision"] == "bf16" and record["mixed_precision"] == "bf16"
    record = json.loads((run(tiny_model, data, tmp_path / "p", max_train_steps=1, mixed_precision="no")
                         / "amnesia.json").read_text())
    assert record["settings"]["mixed_precision"] == "no" and record["mixed_precision"] == "no"


def test_gradient_clipping_bounds_the_update(tiny_model, data, tmp_path):
    """Clipped once per optimizer step, on the gradient with the EWC term in it (Adam's normalised
    step hides clipping in the weights, so the norm it leaves is read instead)."""
    import torch.nn.utils as nn_utils

    seen = []
    real = nn_utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        total = real(params, max_norm, *args, **kwargs)
        seen.append((float(total), float(torch.stack([p.grad.norm() for p in params]).norm())))
        return total

    nn_utils.clip_grad_norm_ = spy
    try:
        run(tiny_model, data, tmp_path / "o", max_train_steps=2, max_grad_norm=1e-3)
    finally:
        nn_utils.clip_grad_norm_ = real
    assert len(seen) == 2  # once per optimizer step
    assert all(before > 1e-3 and after == pytest.approx(1e-3, rel=1e-3) for before, after in seen)


def test_surrogate_set_is_what_is_recorded(tiny_model, data, tmp_path):
    settings = {k: v for k, v in data.items()}
    out = run(tiny_model, settings, tmp_path / "o", max_train_steps=1)
    record = json.loads((out / "amnesia.json").read_text())
    assert record["surrogate"] == "a middle aged man" and record["surrogate_source"] == "surrogate_dir"
    assert record["surrogate_set"] == str(load_image_set(data["surrogate_dir"]).path.resolve())
    assert "a middle aged man" in (out / "README.md").read_text()


def test_one_command_makes_the_replay_set_and_fisher_once_per_base_model(tiny_model, tmp_path, monkeypatch, capsys):
    """`forget` with neither --replay-dir nor --fim: both are made in the cache, said before they
    cost anything, and reused by the next run on the same model; another model gets its own."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\na cat\na house\n")
    settings = {"model": str(tiny_model), "concept": "brad pitt", "surrogate": "a man", "num_surrogate_images": 2,
                "prompts_file": str(prompts), "num_replay_images": 8, "fim_num_timesteps": 5,
                "num_inference_steps": 2, "train_batch_size": 2, "max_train_steps": 2}
    first = forget(ForgetConfig(output_dir=str(tmp_path / "a"), **settings))
    said = capsys.readouterr().out
    assert ("cost of forget: replay set (8 images x 2 steps): 32 passes; surrogate set (2 images x 2 steps): 8 passes; "
            "Fisher (2 samples x 5 timesteps, forward+backward): 10 passes; training (2 steps x 4 images x 1 "
            "accumulation, forward+backward): 8 passes; 58 denoiser passes in all") in said
    assert "replay images:" in said and "denoiser passes/s after the first batch" in said
    record = json.loads((first / "amnesia.json").read_text())
    fim = Path(record["fim"]["path"])
    assert record["fim"]["cached"] and record["fim"]["made_now"] and fim.parent == Path(record["replay_set"]).parent
    with safe_open(str(fim), "pt") as f:
        assert f.metadata()["num_samples"] == "2" and f.metadata()["num_timesteps"] == "5"  # 8 // 4 samples
    stamps = {p: p.stat().st_mtime_ns for p in (fim, Path(record["replay_set"]) / "latents.safetensors")}

    second = forget(ForgetConfig(output_dir=str(tmp_path / "b"), **settings))
    assert ("replay set (8 images x 2 steps): cached; surrogate set (2 images x 2 steps): 8 passes; Fisher (2 samples "
            "x 5 timesteps, forward+backward): 10 passes") in capsys.readouterr().out
    again = json.loads((second / "amnesia.json").read_text())
    assert again["fim"]["path"] == str(fim) and again["replay_set"] == record["replay_set"]
    assert again["fim"]["cached"] and not again["fim"]["made_now"]
    assert again["fim"]["metadata"]["mixed_precision"] == "no"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not made again
    assert unet_weights(first).keys() == unet_weights(second).keys()

    # The same folder changed in place is another model: a new entry, never the stale one.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    before = json.loads((forget(ForgetConfig(output_dir=str(tmp_path / "c"), **{**settings, "model": str(model)}))
                         / "amnesia.json").read_text())
    weights["conv_out.bias"] += 0.5
    save_file(weights, str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    after = json.loads((forget(ForgetConfig(output_dir=str(tmp_path / "d"), **{**settings, "model": str(model)}))
                        / "amnesia.json").read_text())
    assert Path(after["replay_set"]).parent != Path(before["replay_set"]).parent
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 3

    # `amnesia-sd cache list / clear` show and free the entries (only ours).
    from typer.testing import CliRunner

    from amnesia_sd.cli import app

    (tmp_path / "cache" / "models" / "not-ours").mkdir()
    listed = CliRunner().invoke(app, ["cache", "list"])
    assert listed.exit_code == 0 and "3 base model(s)" in listed.output and str(model.resolve()) in listed.output
    cleared = CliRunner().invoke(app, ["cache", "clear", "--model", str(model)])
    assert cleared.exit_code == 0 and cleared.output.startswith("removed 2 entries")
    assert not Path(after["replay_set"]).exists() and Path(record["replay_set"]).exists()
    assert CliRunner().invoke(app, ["cache", "clear"]).output.startswith("removed 1 entry")
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == ["not-ours"]


def test_the_seed_changes_training_and_streams_never_share_noise(tiny_model, data, tmp_path):
    """torch's CPU generator keeps only the low 32 bits of a seed: the run's seed must still count,
    and the Fisher's noise must not be the noise an image was generated from."""
    from amnesia_sd.data.generate import image_seed

    a = unet_weights(run(tiny_model, data, tmp_path / "s0", max_train_steps=2, seed=0))
    b = unet_weights(run(tiny_model, data, tmp_path / "s1", max_train_steps=2, seed=1))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    seeds = {(stream, s): [image_seed(s, i, stream) % 2**32 for i in range(1000)]
             for stream in ("image", "fisher", "train") for s in (0, 1, 2**31 - 1)}
    flat = [x for values in seeds.values() for x in values]
    assert len(set(flat)) == len(flat)  # no two items of any two runs or streams share a generator
    assert seeds[("image", 0)][:3] == [0, 1, 2]  # seed 0's images are what they always were


def test_overwrite_reuses_the_old_results_surrogate_set_without_touching_it(tiny_model, data, tmp_path):
    settings = {"fim": data["fim"], "replay_dir": data["replay_dir"], "surrogate": "a man", "num_surrogate_images": 2,
                "num_inference_steps": 2}
    out = run(tiny_model, settings, tmp_path / "o", max_train_steps=1)
    latents = out / "data" / "surrogate" / "latents.safetensors"
    before = (latents.stat().st_ino, latents.read_bytes())
    run(tiny_model, settings, tmp_path / "o", max_train_steps=2, overwrite=True)
    assert (latents.stat().st_ino, latents.read_bytes()) == before  # hard-linked in, not made again
    assert json.loads((out / "amnesia.json").read_text())["steps"] == 2


PLAIN_LORA_CHECK = """
import sys, torch
from diffusers import StableDiffusionPipeline
sys.stdin.readline()  # started early (conftest's early_python): on once the test has made the result
base, out = sys.argv[1], sys.argv[2]
assert "amnesia_sd" not in sys.modules
pipe = StableDiffusionPipeline.from_pretrained(base)
before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
pipe.load_lora_weights(out)
pipe.fuse_lora()
pipe.unload_lora_weights()
after = pipe.unet.state_dict()
changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
fused = StableDiffusionPipeline.from_pretrained(out).unet.state_dict()  # --fuse: merged by amnesia-sd
assert all(torch.allclose(after[k], fused[k], atol=1e-6) for k in after)
pipe.set_progress_bar_config(disable=True)
assert pipe("a photo of brad pitt", num_inference_steps=2, output_type="np").images.shape[0] == 1
print("CHANGED", ",".join(changed))
"""


@pytest.mark.parametrize("method, targets, layers", [
    ("xattn", "to_q,to_k,to_v,to_out.0", 16),  # the cross-attention of the tiny UNet's four transformer blocks
    # both attentions, the 8 resnets' convs and conv_in: a conv layer's keys come first in the file,
    # as those of SDXL's (attention-free) down_blocks.0 do
    ("full", "to_q,to_k,to_v,to_out.0,conv_in,conv1,conv2", 32 + 16 + 1),
])
def test_lora_result_loads_in_plain_diffusers(tiny_model, data, tmp_path, method, targets, layers, early_python):
    from diffusers import UNet2DConditionModel

    from amnesia_sd.model.trainable import lora_modules

    plain_lora_check = early_python(PLAIN_LORA_CHECK, tiny_model, tmp_path / "lora")
    out = run(tiny_model, data, tmp_path / "lora", lora_rank=4, fuse=True, train_method=method, lora_targets=targets,
              max_train_steps=2)
    record = json.loads((out / "amnesia.json").read_text())
    lora = record["lora"]
    assert lora["rank"] == 4 and lora["adapted_layers"] == layers and lora["fused_pipeline"] is True
    unet_bytes = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert lora["bytes"] == (out / "pytorch_lora_weights.safetensors").stat().st_size < unet_bytes / 10
    assert "load_lora_weights" in (out / "README.md").read_text()
    check = plain_lora_check()  # a fresh interpreter, without amnesia_sd, loads tmp_path / "lora" = out
    assert "CHANGED" in check.stdout, check.stderr
    changed = check.stdout.split("CHANGED ")[1].strip().split(",")
    # Exactly the adapted layers' weights moved, every one of them (diffusers once dropped the
    # attention adapters of a file that also had conv adapters, silently).
    adapted = lora_modules(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), method, targets.split(","))
    assert changed == sorted(f"{m}.weight" for m in adapted) and len(changed) == layers


def test_lora_results_of_earlier_versions_load_with_every_adapter(tiny_model, data, tmp_path):
    """Earlier versions wrote attention adapters as lora.down/up beside conv adapters as lora_A/B,
    a mix from which diffusers' loader drops the former: amnesia-sd reads such files whole."""
    import shutil

    from safetensors.torch import load_file, save_file

    from amnesia_sd.model.loading import load_pipeline, resolve_model

    out = run(tiny_model, data, tmp_path / "new", lora_rank=2, lora_targets="to_q,to_k,to_v,to_out.0,conv_in",
              max_train_steps=1)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    mixed = {(k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") if ".to_" in k else k): v
             for k, v in state.items()}
    assert mixed.keys() != state.keys() and min(mixed).startswith("unet.conv_in.lora_A")
    save_file(mixed, str(old / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    base = load_pipeline(resolve_model(str(tiny_model)), torch.float32, False).unet.state_dict()
    merged = {name: load_pipeline(resolve_model(str(folder)), torch.float32, False).unet.state_dict()
              for name, folder in (("new", out), ("old", old))}
    moved = [k for k in base if not torch.equal(base[k], merged["new"][k])]
    assert len(moved) == 32 + 1  # every adapted layer: 32 attention projections and conv_in
    for k in base:
        torch.testing.assert_close(merged["old"][k], merged["new"][k], rtol=0, atol=0)


def test_lora_resumed_run_equals_uninterrupted_run_and_checkpoints_are_small(tiny_model, data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    settings = {"lora_rank": 2, "max_train_steps": 4, "checkpointing_steps": 2, "ema_decay": 0.9}
    straight = run(tiny_model, data, tmp_path / "straight", **settings)
    killed_after_first_checkpoint(monkeypatch, tiny_model, data, tmp_path / "resumed", **settings)
    checkpoint = tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert "lora_adapters.safetensors" in files and not {"model.safetensors", "pytorch_model.bin"} & files
    resumed = run(tiny_model, data, tmp_path / "resumed", **settings, resume_from_checkpoint="latest")
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    # A and B of to_q, to_k, to_v, to_out.0 in attn1 and attn2 of four transformer blocks
    assert a.keys() == b.keys() and len(a) == 2 * 4 * 2 * 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert not (resumed / "unet").exists()  # no --fuse: the adapter alone


def test_lr_warmup_rises_linearly_and_resumes_exactly(tiny_model, data, tmp_path, monkeypatch):
    """--lr-warmup-steps: the learning rate of step k is lr * k / (warmup + 1) until it reaches lr; a run
    resumed in the warm-up continues it (the scheduler is in the checkpoint)."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    straight = run(tiny_model, data, tmp_path / "straight", max_train_steps=5, lr_warmup_steps=3,
                   checkpointing_steps=2)
    assert seen == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3)] + [1e-3, 1e-3])
    killed_after_first_checkpoint(monkeypatch, tiny_model, data, tmp_path / "resumed", max_train_steps=5,
                                  lr_warmup_steps=3, checkpointing_steps=2)
    seen.clear()
    resumed = run(tiny_model, data, tmp_path / "resumed", max_train_steps=5, lr_warmup_steps=3,
                  checkpointing_steps=2, resume_from_checkpoint="latest")
    assert seen == pytest.approx([3e-3 / 4, 1e-3, 1e-3])
    a, b = unet_weights(straight), unet_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def skip_optimizer_steps(monkeypatch, skipped: set[int]) -> list[float]:
    """Make the optimizer steps numbered in `skipped` (from 1) act as fp16's loss scaler does on inf/NaN
    gradients: no update, step_was_skipped set. Returns the learning rate each optimizer step saw."""
    from accelerate.optimizer import AcceleratedOptimizer

    real_step, seen = AcceleratedOptimizer.step, []

    def step(self, closure=None):
        if self.gradient_state.sync_gradients:
            seen.append(self.param_groups[0]["lr"])
            self._is_overflow = len(seen) in skipped
            if self._is_overflow:
                return
        real_step(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    return seen


def test_fp16_skipped_step_is_not_a_training_step(tiny_model, data, tmp_path, monkeypatch):
    """An optimizer step fp16's loss scaler skips moves neither the warm-up nor the EMA, is not counted
    as a step, and is recorded; three steps are three real updates."""
    from diffusers.training_utils import EMAModel

    seen = skip_optimizer_steps(monkeypatch, {2})
    real_ema_step, ema_steps = EMAModel.step, []

    def counted_ema_step(self, params):
        ema_steps.append(1)
        real_ema_step(self, params)

    monkeypatch.setattr(EMAModel, "step", counted_ema_step)
    out = run(tiny_model, data, tmp_path / "out", lr_warmup_steps=2, ema_decay=0.5)
    record = json.loads((out / "amnesia.json").read_text())
    assert record["steps"] == 3 and record["skipped_steps"] == 1
    # the skipped 2nd step's warm-up rate is used again by the next one
    assert seen == pytest.approx([1e-3 / 3, 2e-3 / 3, 2e-3 / 3, 1e-3])
    assert len(ema_steps) == 3


def test_fp16_steps_skipped_again_and_again_stop_the_run(tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(forget_module, "MAX_SKIPPED_IN_A_ROW", 3)
    skip_optimizer_steps(monkeypatch, {2, 3, 4})
    with pytest.raises(UserError, match=r"fp16 loss scale kept overflowing .*--mixed-precision bf16\) at step 2"):
        run(tiny_model, data, tmp_path / "out", max_train_steps=5)
    assert not (tmp_path / "out").exists()
