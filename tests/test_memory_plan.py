"""The memory plan: sizes that never change results are chosen to fit the budget, and a run that
cannot fit is refused before any work, with the settings that would."""

import json
from amnesia_sd.model.families import FAMILIES
from amnesia_sd.model.memory import activation_peak, meta_copy

import pytest
import torch
from safetensors.torch import load_file

from helpers import load_parts, make_sets, run_command

QUICK = ["--num-inference-steps", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    return make_sets(tiny_model, tmp_path_factory.mktemp("memory"))


def fisher_peak(tiny_model, chunk: int, checkpointing: bool = False) -> int:
    """What the plan predicts for the tiny model's Fisher at 8x8 latents (fp32)."""
    pipe, _ = load_parts(tiny_model)
    n = sum(p.numel() for p in pipe.unet.parameters())
    resident = sum(p.numel() * 4 for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()) + 8 * n
    return resident + activation_peak(FAMILIES["sd"], meta_copy(pipe.unet), chunk, (8, 8), "no", checkpointing)


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing(tiny_model):
    pipe, _ = load_parts(tiny_model)
    meta = meta_copy(pipe.unet)
    one, two = (activation_peak(FAMILIES["sd"], meta, b, (8, 8), "no", False) for b in (1, 2))
    assert two == pytest.approx(2 * one, rel=0.05) and one > 0
    assert activation_peak(FAMILIES["sd"], meta, 2, (8, 8), "no", True) < two
    # bf16 autocast: activations in 16 bits, plus the 16-bit copy of every layer's weight
    half = activation_peak(FAMILIES["sd"], meta, 2, (8, 8), "bf16", False)
    layers = sum(m.weight.numel() for m in pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert half - 2 * layers == pytest.approx(two / 2, rel=0.1)


def test_a_small_budget_gives_a_smaller_timestep_batch_and_the_same_fisher(tiny_model, work):
    args = ["fim", "--model", tiny_model, "--replay-dir", "replay", "--num-timesteps", "8"]
    full = run_command(*args, "--output", "all.safetensors", cwd=work)
    assert "8 timestep(s) per pass" in full.output and "no budget on the CPU" in full.output
    budget_kb = (fisher_peak(tiny_model, 3) + 999) // 1000  # room for 3 timesteps, not 4
    assert fisher_peak(tiny_model, 4) > budget_kb * 1000
    small = run_command(*args, "--output", "small.safetensors", "--max-memory", f"{budget_kb}KB", cwd=work)
    assert "3 timestep(s) per pass" in small.output
    a, b = load_file(str(work / "all.safetensors")), load_file(str(work / "small.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * a[k].abs().max().item())
    # A given batch is kept, but checked against the plan.
    refused = run_command(*args, "--output", "given.safetensors", "--max-memory", f"{budget_kb}KB",
                          "--timestep-batch-size", "8", code=2, cwd=work)
    assert "--timestep-batch-size 8 needs about" in refused.output and "use --timestep-batch-size 3" in refused.output
    assert not (work / "given.safetensors").exists()


def test_a_budget_too_small_for_one_timestep_names_checkpointing(tiny_model, work):
    budget_kb = (fisher_peak(tiny_model, 1, checkpointing=True) + 999) // 1000
    assert fisher_peak(tiny_model, 1) > budget_kb * 1000
    refused = run_command("fim", "--model", tiny_model, "--replay-dir", "replay", "--num-timesteps", "8", "--output",
                          "none.safetensors", "--max-memory", f"{budget_kb}KB", code=2, cwd=work)
    assert "with one timestep at a time" in refused.output and "add --gradient-checkpointing" in refused.output
    assert not (work / "none.safetensors").exists()


def test_forget_over_the_budget_is_refused_before_any_work_listing_what_fits(tiny_model, work, tmp_path):
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.model.training_memory import training_peak

    pipe, _ = load_parts(tiny_model)
    settings = {"model": str(tiny_model), "concept": "brad pitt", "surrogate_dir": str(work / "surrogate"),
                "replay_dir": str(work / "replay"), "fim": "unused", "output_dir": "unused", "train_batch_size": 4}
    peak = training_peak(FAMILIES["sd"], pipe.unet, ForgetConfig(**settings), (8, 8), "no")
    lora = training_peak(FAMILIES["sd"], pipe.unet, ForgetConfig(**{**settings, "lora_rank": 8}), (8, 8), "no")
    assert lora < peak
    budget_kb = (lora + 999) // 1000  # LoRA fits, full weights do not
    run_command("fim", "--model", tiny_model, "--replay-dir", "replay", "--num-timesteps", "2", "--output",
                "fim.safetensors", cwd=work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    refused = run_command("forget", "--model", tiny_model, "--concept", "brad pitt", "--surrogate-dir", "surrogate",
                          "--replay-dir", "replay", "--fim", "fim.safetensors", "--output-dir", "out",
                          "--train-batch-size", "4", "--max-memory", f"{budget_kb}KB", code=2, cwd=work)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: training needs about") and "--lora-rank 8 (" in line and "fits)" in line
    assert "--gradient-checkpointing (" in line and "Traceback" not in refused.output
    assert not (work / "out").exists() and not (work / "out.partial").exists()
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    # With the option it lists as fitting, the same budget trains.
    done = run_command("forget", "--model", tiny_model, "--concept", "brad pitt", "--surrogate-dir", "surrogate",
                       "--replay-dir", "replay", "--fim", "fim.safetensors", "--output-dir", "out",
                       "--train-batch-size", "4", "--max-memory", f"{budget_kb}KB", "--lora-rank", "8",
                       "--max-train-steps", "1", cwd=work)
    assert "memory plan of training: predicted peak" in done.output
    assert json.loads((work / "out" / "amnesia.json").read_text())["steps"] == 1


def test_max_memory_must_be_a_size(tiny_model, work):
    refused = run_command("fim", "--model", tiny_model, "--replay-dir", "replay", "--output", "x.safetensors",
                          "--max-memory", "lots", code=2, cwd=work)
    assert "--max-memory 'lots' is not a size: write it like 20GB or 18GiB" in refused.output


def test_gpu_default_is_bf16_where_the_gpu_has_it_and_fp32_on_the_cpu(monkeypatch):
    from amnesia_sd.core import config as config_module
    from amnesia_sd.core.config import FimConfig

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    settings = {"model": "m", "output": "f.safetensors"}
    assert FimConfig(**settings).mixed_precision == "no"  # this machine: no CUDA
    monkeypatch.setattr(config_module, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert FimConfig(**settings).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100: fp32, never fp16 silently
    assert FimConfig(**settings).mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate's config still decides
    assert FimConfig(**settings).mixed_precision == "fp16"
    assert FimConfig(**settings, mixed_precision="no").mixed_precision == "no"  # and the flag over both


def sampling_peak_of(tiny_model, batch: int) -> int:
    """The plan's figure for sampling the tiny model at its native 16 px (8x8 latents) with guidance (fp32)."""
    from amnesia_sd.data.generate import vae_dtype
    from amnesia_sd.model.memory import sampling_peak

    pipe, _ = load_parts(tiny_model)
    resident = sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    return resident + sampling_peak(FAMILIES["sd"], meta_copy(pipe.unet), meta_copy(pipe.vae), batch, (8, 8),
                                    torch.float32, True, vae_dtype(pipe.vae))


def test_sampling_counts_the_live_tensors_of_a_denoising_step_and_the_decode(tiny_model):
    one, two = sampling_peak_of(tiny_model, 1), sampling_peak_of(tiny_model, 2)
    pipe, _ = load_parts(tiny_model)
    resident = sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert 0 < one - resident < two - resident <= 2.2 * (one - resident)


def test_a_small_budget_samples_in_smaller_batches_and_too_small_is_refused(tiny_model, tmp_path):
    args = ["replay", "--model", tiny_model, "--num-images", "5", "--num-inference-steps", "2"]
    free = run_command(*args, "--output-dir", "all", cwd=tmp_path)
    assert "memory plan of sampling: 8 image(s) per batch" in free.output
    budget_kb = (sampling_peak_of(tiny_model, 3) + 999) // 1000
    assert sampling_peak_of(tiny_model, 4) > budget_kb * 1000
    small = run_command(*args, "--output-dir", "small", "--max-memory", f"{budget_kb}KB", cwd=tmp_path)
    assert "memory plan of sampling: 3 image(s) per batch" in small.output
    assert len(list((tmp_path / "small" / "images").glob("*.png"))) == 5
    refused = run_command(*args, "--output-dir", "given", "--max-memory", f"{budget_kb}KB", "--batch-size", "5",
                          code=2, cwd=tmp_path)
    assert "--batch-size 5 needs about" in refused.output and "use --batch-size 3" in refused.output
    tiny_kb = (sampling_peak_of(tiny_model, 1) - 1000) // 1000
    none = run_command(*args, "--output-dir", "none", "--max-memory", f"{tiny_kb}KB", code=2, cwd=tmp_path)
    assert "sampling needs about" in none.output and "with one image at a time" in none.output
    for folder in ("given", "none"):
        assert not (tmp_path / folder).exists()


def test_attack_refuses_a_token_batch_over_the_budget_before_any_image(tiny_model, tmp_path):
    pipe, _ = load_parts(tiny_model)
    resident = sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    meta = meta_copy(pipe.unet)
    peak = lambda b: resident + activation_peak(FAMILIES["sd"], meta, b, (8, 8), "no", False)  # noqa: E731
    budget_kb = (peak(2) + 999) // 1000
    assert peak(3) > budget_kb * 1000
    refused = run_command("attack", "--model", tiny_model, "--base", tiny_model, "--concept", "Brad Pitt",
                          "--output-dir", "a", "--method", "ti", "--train-batch-size", "4", "--max-memory", f"{budget_kb}KB",
                          "--clip-model", "not/available", "--num-inference-steps", "2", code=2, cwd=tmp_path)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "learning the token needs about" in line and "--train-batch-size 2 fits" in line
    assert not list(tmp_path.iterdir())  # not even a concept image: nothing left behind


def test_the_inner_attack_counts_in_forgets_plan(tiny_model):
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.model.training_memory import training_peak

    pipe, _ = load_parts(tiny_model)
    settings = {"model": "m", "concept": "brad pitt", "surrogate": "a man", "output_dir": "o", "train_batch_size": 1}
    plain = training_peak(FAMILIES["sd"], pipe.unet, ForgetConfig(**settings), (8, 8), "no")
    small = training_peak(FAMILIES["sd"], pipe.unet, ForgetConfig(**settings, adversarial=True,
                                                                  adversarial_batch_size=1), (8, 8), "no", 10**6)
    large = training_peak(FAMILIES["sd"], pipe.unet, ForgetConfig(**settings, adversarial=True,
                                                                  adversarial_batch_size=16), (8, 8), "no", 10**6)
    assert plain <= small < large  # a large inner batch is what the peak follows


def test_fsdp_shards_what_is_resident_and_adds_the_gathered_units(tiny_model):
    """Under FSDP over 2 processes each holds half of the weights, gradients, optimizer state, Fisher,
    anchor and EMA, plus the units it all-gathers; a budget the 2-process plan fits is refused to
    one process, and under it the refusal says per process."""
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.core.errors import UserError
    from amnesia_sd.model.training_memory import (check_training_memory, fsdp_units, memory_parts, training_peak,
                                                  unsharded_bytes)

    unet = load_parts(tiny_model)[0].unet
    n = sum(p.numel() for p in unet.parameters())
    one, two = (memory_parts(n, n, 8 * n, False, True, shards=s) for s in (1, 2))
    assert two == {k: (v + 1) // 2 for k, v in one.items()} and all(one.values())
    # The units, counted another way: a unit's own parameters are those in no unit nested in it.
    names = set(type(unet)._no_split_modules)
    units = [m for m in unet.modules() if type(m).__name__ in names]
    inner = lambda u: {id(p) for v in u.modules() if v is not u and v in units for p in v.parameters()}  # noqa: E731
    in_units = {id(p) for u in units for p in u.parameters()}
    largest, root = fsdp_units(unet)
    assert largest == max(sum(p.numel() for p in u.parameters() if id(p) not in inner(u)) for u in units) > 0
    assert root == sum(p.numel() for p in unet.parameters() if id(p) not in in_units) > 0
    gathered = unsharded_bytes(unet, "no")
    assert 0 < gathered < 8 * n  # less than the whole model in fp32 with its gradient

    config = ForgetConfig(model="m", concept="brad pitt", surrogate="a man", output_dir="o", train_batch_size=1)
    peak1, peak2 = (training_peak(FAMILIES["sd"], unet, config, (8, 8), "no", shards=s) for s in (1, 2))
    resident = [sum(memory_parts(n, n, 2 * 4 * n, False, False, shards=s).values()) for s in (1, 2)]  # no EMA
    assert peak2 == peak1 - resident[0] + resident[1] + gathered < peak1
    assert check_training_memory(FAMILIES["sd"], unet, config, (8, 8), "no", peak2, shards=2) == peak2
    with pytest.raises(UserError, match="training needs about .* on the device at its peak"):
        check_training_memory(FAMILIES["sd"], unet, config, (8, 8), "no", peak2)
    with pytest.raises(UserError, match=r"per process \(FSDP over 2 processes\) at its peak.*--lora-rank 8 \("):
        check_training_memory(FAMILIES["sd"], unet, config, (8, 8), "no", peak2 - 1, shards=2)


def test_out_of_memory_in_training_is_one_line_and_a_rerun_picks_up_what_was_made(tiny_model, tmp_path, monkeypatch):
    """A CUDA out-of-memory (raised here by hand: this machine has no GPU) mid-training: exit 2, the
    phase, the plan's prediction and what to change in one line; the sets made stay, and the rerun
    with --gradient-checkpointing resumes from the checkpoint instead of making them again."""
    from amnesia_sd.commands import forget as forget_module

    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "cache"))
    args = ["forget", "--model", tiny_model, "--concept", "brad pitt", "--surrogate", "a man", "--output-dir", "out",
            "--num-surrogate-images", "2", "--num-replay-images", "4", "--fim-num-timesteps", "2",
            "--num-inference-steps", "2", "--train-batch-size", "1", "--max-train-steps", "4",
            "--checkpointing-steps", "2"]
    real, calls = forget_module.per_sample_loss, []

    def runs_out_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(forget_module, "per_sample_loss", runs_out_at_step_3)
    failed = run_command(*args, code=2, cwd=tmp_path)
    [line] = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: out of memory on the device in training: the plan predicted a peak of ")
    assert "--resume-from-checkpoint latest to go on from checkpoint-2" in line and "Traceback" not in failed.output
    assert (tmp_path / "out.partial" / "data" / "surrogate" / "manifest.json").is_file()
    monkeypatch.setattr(forget_module, "per_sample_loss", real)
    again = run_command(*args, "--gradient-checkpointing", "--resume-from-checkpoint", "latest", cwd=tmp_path)
    assert "surrogate set (2 images x 2 steps): cached" in again.output and "resumed from" in again.output
    assert json.loads((tmp_path / "out" / "amnesia.json").read_text())["steps"] == 4


def test_out_of_memory_in_the_fisher_names_its_chunk(tiny_model, tmp_path, monkeypatch):
    from amnesia_sd.method import fisher as fisher_module

    run_command("replay", "--model", tiny_model, "--output-dir", "replay", "--num-images", "2", *QUICK, cwd=tmp_path)
    monkeypatch.setattr(fisher_module, "per_sample_loss",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    failed = run_command("fim", "--model", tiny_model, "--replay-dir", "replay", "--output", "f.safetensors",
                         "--num-timesteps", "4", code=2, cwd=tmp_path)
    [line] = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert "out of memory on the device in the Fisher" in line and "--timestep-batch-size (this run took 4)" in line
    assert not (tmp_path / "f.safetensors").exists()


def test_out_of_memory_while_sampling_names_the_batch(tiny_model, tmp_path, monkeypatch):
    from amnesia_sd.data import generate as generate_module

    monkeypatch.setattr(generate_module, "decode",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    failed = run_command("replay", "--model", tiny_model, "--output-dir", "r", "--num-images", "3",
                         "--num-inference-steps", "2", code=2, cwd=tmp_path)
    [line] = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert "out of memory on the device in sampling: the plan predicted a peak of" in line
    assert "--batch-size (this run sampled 8 at a time)" in line
