"""Several processes over gloo on the CPU, launched the ways users launch them (accelerate launch,
torchrun): results must equal a single process's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_command, unet_weights
from launching import (QUICK, assert_same_update, forget_args, kill_at_checkpoint, launch, shared_sets,
                       worker_exit_codes)

@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    return shared_sets(tiny_model, tmp_path_factory.mktemp("dist"))


def test_replay_with_two_processes_equals_one_file_by_file(tiny_model, work):
    # 5 images over 2 processes: an uneven split.
    launch("accelerate", 2, "replay", "--model", str(tiny_model), "--output-dir", "replay-2", "--num-images", "5",
           *QUICK, cwd=work)
    one, two = work / "replay", work / "replay-2"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 5
    for name in files:
        if name.name == "manifest.json":  # identical but for nothing: compared as data
            assert json.loads((one / name).read_text()) == json.loads((two / name).read_text())
        elif name.suffix == ".safetensors":
            a, b = load_file(str(one / name)), load_file(str(two / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_fim_with_two_processes_equals_one(tiny_model, work):
    launch("torchrun", 2, "fim", "--model", str(tiny_model), "--replay-dir", "replay", "--output", "fim-2.safetensors",
           "--num-timesteps", "8", "--timestep-batch-size", "4", cwd=work)
    one, two = load_file(str(work / "fim.safetensors")), load_file(str(work / "fim-2.safetensors"))
    assert one.keys() == two.keys() and len(one) > 10
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6 * one[k].abs().max().item())
    assert sum(v.sum().item() for v in one.values()) > 0


ADVERSARIAL = ["--adversarial", "--adversarial-steps", "2", "--adversarial-images", "3", "--adversarial-initializer",
               "man", "--adversarial-batch-size", "2", "--num-inference-steps", "2"]


# Modes whose penalty reaches the weights by different paths: the whole UNet against a copy of
# theta*, a bf16-stored Fisher and anchor, LoRA's penalty on B A, the inner attack; with gradient
# accumulation, the penalty is added once per optimizer step.
MODES = {
    "plain": [],
    "adversarial": ADVERSARIAL,
    "bf16-fisher-accumulation": ["--fim-dtype", "bf16", "--gradient-accumulation-steps", "2"],
    "lora-accumulation": ["--lora-rank", "2", "--gradient-accumulation-steps", "2"],
}


@pytest.mark.parametrize("mode", MODES)
def test_forget_two_processes_of_batch_b_equal_one_process_of_batch_2b(tiny_model, work, mode):
    # Several steps: at step 1 theta = theta*, so the penalty is zero by construction and a process
    # that lost it would still agree. The record's ewc is the last step's value.
    model, extra, steps = str(tiny_model), [*MODES[mode], "--max-train-steps", "4"], "4"
    one_dir, two_dir = f"{mode}-one", f"{mode}-two"
    run_command(*forget_args(model, one_dir, 2, *extra), cwd=work)  # one process: this one
    launch("accelerate", 2, *forget_args(model, two_dir, 1, *extra), cwd=work)
    one = json.loads((work / one_dir / "amnesia.json").read_text())
    two = json.loads((work / two_dir / "amnesia.json").read_text())
    if mode == "adversarial":  # the inner attack learned the same token in both (process 0's, broadcast)
        assert one["adversarial"]["rounds"][0]["loss_last"] == pytest.approx(
            two["adversarial"]["rounds"][0]["loss_last"], rel=1e-5)
        a, b = (load_file(str(work / d / "adversary_embeds.safetensors")) for d in (one_dir, two_dir))
        torch.testing.assert_close(a["<amnesia-adversary>"], b["<amnesia-adversary>"], rtol=1e-5, atol=1e-6)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    accumulation = one["settings"]["gradient_accumulation_steps"]
    assert one["global_batch_size"] == two["global_batch_size"] == 2 * accumulation
    assert one["learning_rate"] == two["learning_rate"] == 1e-3  # not scaled by the process count
    assert one["steps"] == two["steps"] == int(steps)
    assert one["final_losses"]["ewc"] > 1e-3  # the anchor pulls after the first step
    for term in ("surrogate", "replay", "ewc"):  # the last step's losses over the same global batch
        assert two["final_losses"][term] == pytest.approx(one["final_losses"][term], rel=1e-4)
    # Averaged gradients over the same images: the same update, and a loadable result.
    lora = "lora" in mode
    assert_same_update(work / one_dir, work / two_dir, None if lora else unet_weights(tiny_model))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model if lora else work / two_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(work / two_dir)
    else:
        assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], unet_weights(work / two_dir)["conv_in.weight"])


def test_forget_with_two_processes_resumes_after_a_kill(tiny_model, work):
    model = str(tiny_model)
    args = forget_args(model, "killed", 1, "--max-train-steps", "24", "--checkpointing-steps", "4")
    kept = kill_at_checkpoint("torchrun", args, work, "killed")
    assert kept and kept[-1] >= 8

    refused = launch("torchrun", 2, *args, cwd=work, check=False)  # neither resumed nor overwritten: refused
    assert refused.returncode != 0  # torchrun's own code when a worker fails (1)
    # Every worker exits with the README's code 2 for input errors (the second may be stopped with
    # SIGTERM by torchrun once the first has failed), and one `error: ...` line speaks for both, no traceback.
    first, codes = worker_exit_codes(refused.stderr)
    assert first == 2 and set(codes) <= {2, -15} and len(codes) in (1, 2), refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume-from-checkpoint latest" in errors[0], refused.stderr[-3000:]
    assert refused.stderr.count("--resume-from-checkpoint latest") == 1
    frames = [line for line in refused.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [line for line in frames if "amnesia_sd" in line]  # only torchrun's own traceback
    launch("torchrun", 2, *args, "--resume-from-checkpoint", "latest", cwd=work)
    # The uninterrupted reference is one process of the same global batch: the two processes kept
    # the penalty through the kill and the resume, not only each other's company.
    run_command(*forget_args(model, "straight", 2, "--max-train-steps", "24"), cwd=work)
    assert_same_update(work / "killed", work / "straight", unet_weights(tiny_model))
    records = [json.loads((work / d / "amnesia.json").read_text()) for d in ("killed", "straight")]
    assert [r["steps"] for r in records] == [24, 24]
    assert records[0]["final_losses"]["ewc"] > 1e-3
    assert records[0]["final_losses"]["ewc"] == pytest.approx(records[1]["final_losses"]["ewc"], rel=1e-4)


def test_eval_with_two_processes_equals_one(tiny_model, work):
    args = ["eval", "--model", str(tiny_model), "--base", str(tiny_model), "--concept", "Brad Pitt",
            "--num-images", "3", "--num-inference-steps", "2", "--batch-size", "2", "--clip-model", "not/available"]
    run_command(*args, "--output-dir", "eval-1", cwd=work)  # one process: this one
    launch("torchrun", 2, *args, "--output-dir", "eval-2", cwd=work)
    one, two = work / "eval-1", work / "eval-2"
    images = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(images) >= 8 and images == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for name in images:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert a["sets"] == b["sets"]


def test_attack_with_two_processes_equals_one(tiny_model, work):
    # --batch-size 1: each process samples every other image; the token is learned by both alike.
    args = ["attack", "--model", str(tiny_model), "--base", str(tiny_model), "--concept", "Brad Pitt",
            "--initializer", "man", "--steps", "3", "--measure-steps", "2", "--num-images", "3",
            "--num-inference-steps", "2", "--batch-size", "1", "--clip-model", "not/available", "--strength", "0.5",
            "--prompt-words", "2", "--prompt-steps", "2"]
    run_command(*args, "--output-dir", "attack-1", cwd=work)  # one process: this one
    launch("accelerate", 2, *args, "--output-dir", "attack-2", cwd=work)
    one, two = work / "attack-1", work / "attack-2"
    images = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(images) >= 3 * 9 and images == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for name in images:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = (load_file(str(d / "learned_embeds.safetensors")) for d in (one, two))
    torch.testing.assert_close(a["<amnesia-concept>"], b["<amnesia-concept>"], rtol=1e-5, atol=1e-6)
    records = [json.loads((d / "attack.json").read_text()) for d in (one, two)]
    assert [r["num_processes"] for r in records] == [1, 2]
    ti = [r["methods"]["ti"] for r in records]
    assert ti[0]["training"]["losses"] == pytest.approx(ti[1]["training"]["losses"], rel=1e-5)
    assert records[0]["methods"]["prompt"]["prompt"] == records[1]["methods"]["prompt"]["prompt"]
