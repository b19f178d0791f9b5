"""forget and fim under accelerate's FSDP (version 2, full shard), launched with the config file
docs/multi-gpu.md gives users, as 2 processes on the CPU over gloo: the same Fisher, losses and
weights as one process, each process holding half of F and theta*, and an exact resume after a kill."""

import json
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import ENV, run_command, unet_weights
from launching import assert_same_update, command, forget_args, launch, shared_sets

STEPS = ["--max-train-steps", "4"]
MODES = {"full": [], "lora-accumulation": ["--lora-rank", "2", "--gradient-accumulation-steps", "2"]}


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    return shared_sets(tiny_model, tmp_path_factory.mktemp("fsdp"))


def test_fim_under_fsdp_equals_one_process(tiny_model, work):
    # 8 timesteps in chunks of 3: 3 chunks over 2 processes, so one process makes a pass at weight 0.
    launch("fsdp", 2, "fim", "--model", str(tiny_model), "--replay-dir", "replay", "--output", "fim-fsdp.safetensors",
           "--num-timesteps", "8", "--timestep-batch-size", "3", cwd=work)
    one, fsdp = load_file(str(work / "fim.safetensors")), load_file(str(work / "fim-fsdp.safetensors"))
    assert one.keys() == fsdp.keys() == unet_weights(tiny_model).keys()
    for k in one:
        assert fsdp[k].shape == one[k].shape
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-4, atol=1e-5 * one[k].abs().max().item())
    # Not the sum of squares of gradients averaged over processes (a quarter of it, or less).
    assert sum(v.sum().item() for v in fsdp.values()) == pytest.approx(sum(v.sum().item() for v in one.values()),
                                                                      rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_forget_under_fsdp_equals_one_process(tiny_model, work, mode):
    extra = MODES[mode]
    one_dir, fsdp_dir = f"{mode}-one", f"{mode}-fsdp"
    run_command(*forget_args(str(tiny_model), one_dir, 2, *extra, *STEPS), cwd=work)
    launch("fsdp", 2, *forget_args(str(tiny_model), fsdp_dir, 1, *extra, *STEPS), cwd=work)
    one, fsdp = (json.loads((work / d / "amnesia.json").read_text()) for d in (one_dir, fsdp_dir))
    assert (one["distributed"], fsdp["distributed"]) == ("NO", "FSDP")
    assert one["global_batch_size"] == fsdp["global_batch_size"] and fsdp["steps"] == one["steps"] == 4
    assert one["final_losses"]["ewc"] > 1e-3  # past step 1, where the penalty is zero by construction
    for term in ("surrogate", "replay", "ewc"):  # the penalty's value is the sum of the processes' parts
        assert fsdp["final_losses"][term] == pytest.approx(one["final_losses"][term], rel=1e-4)
    # What each process held of F (and theta*): its rows, half of one process's, to the row rounding.
    (whole,), halves = one["penalty_bytes_per_process"], fsdp["penalty_bytes_per_process"]
    assert len(halves) == 2 and sum(halves) == whole and max(halves) <= 0.52 * whole
    lora = mode != "full"
    assert_same_update(work / one_dir, work / fsdp_dir, None if lora else unet_weights(tiny_model))
    # The same kind of result, read by plain diffusers.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model if lora else work / fsdp_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(work / fsdp_dir)
        assert sum("lora" in n for n, _ in pipe.unet.named_parameters()) > 0
    else:
        assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], unet_weights(work / fsdp_dir)["conv_in.weight"])
        assert not (work / fsdp_dir / "checkpoints").exists()


def test_lora_on_a_bf16_base_under_fsdp_agrees_with_one_process_to_bf16_precision(tiny_model, work):
    """What GPU users run: --mixed-precision bf16 (a LoRA run's frozen base in bf16, adapters in fp32).
    FSDP computes with weights gathered in bf16 and reduces gradients in float32, one process under
    autocast: the same run to bf16's precision."""
    extra = ["--lora-rank", "2", "--mixed-precision", "bf16", *STEPS]
    run_command(*forget_args(str(tiny_model), "bf16-one", 2, *extra), cwd=work)
    launch("fsdp", 2, *forget_args(str(tiny_model), "bf16-fsdp", 1, *extra), cwd=work)
    one, fsdp = (json.loads((work / d / "amnesia.json").read_text()) for d in ("bf16-one", "bf16-fsdp"))
    assert fsdp["mixed_precision"] == "bf16" and fsdp["distributed"] == "FSDP"
    for term in ("surrogate", "replay", "ewc"):
        assert fsdp["final_losses"][term] == pytest.approx(one["final_losses"][term], rel=5e-3)
    a, b = (load_file(str(work / d / "pytorch_lora_weights.safetensors")) for d in ("bf16-one", "bf16-fsdp"))
    assert a.keys() == b.keys()
    one_b, fsdp_b = (torch.cat([w[k].flatten() for k in a if "lora_B" in k]) for w in (a, b))  # B starts at 0
    # Adam's first steps are about lr * sign(g): where g is near zero at bf16's precision, either sign
    # (measured: 4% of the update; in float32 the two agree to 4e-9).
    assert one_b.abs().max() > 1e-4 and (fsdp_b - one_b).norm() <= 0.1 * one_b.norm()


def test_forget_under_fsdp_resumes_after_a_kill(tiny_model, work):
    args = forget_args(str(tiny_model), "killed", 1, "--max-train-steps", "16", "--checkpointing-steps", "4")
    run = subprocess.Popen(command("fsdp", 2, *args), cwd=work, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    checkpoints = work / "killed.partial" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "checkpoint-8").is_dir() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    launcher = psutil.Process(run.pid)
    workers = launcher.children(recursive=True)
    for process in [launcher, *workers]:
        process.kill()
    run.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not (work / "killed" / "amnesia.json").exists(), "the run finished before it could be killed"
    kept = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert kept and kept[-1] >= 8
    # Sharded: each process wrote its own part of the weights and of the optimizer state.
    assert list((checkpoints / f"checkpoint-{kept[-1]}").glob("pytorch_model_fsdp_0/__1_*.distcp"))
    launch("fsdp", 2, *args, "--resume-from-checkpoint", "latest", cwd=work)
    run_command(*forget_args(str(tiny_model), "straight", 2, "--max-train-steps", "16"), cwd=work)
    assert_same_update(work / "killed", work / "straight", unet_weights(tiny_model))
    records = [json.loads((work / d / "amnesia.json").read_text()) for d in ("killed", "straight")]
    assert records[0]["steps"] == records[1]["steps"] == 16
    assert records[0]["final_losses"]["ewc"] > 1e-3
    assert records[0]["final_losses"]["ewc"] == pytest.approx(records[1]["final_losses"]["ewc"], rel=1e-4)


def test_fsdp_refusals_are_one_line_before_any_work(tiny_model, work):
    args = forget_args(str(tiny_model), "refused", 1, *STEPS)
    without_fim = args[:args.index("--fim")] + args[args.index("--fim") + 2:]
    for given, says in ((args + ["--ema-decay", "0.999"], "--ema-decay"), (without_fim, "--fim")):
        done = launch("fsdp", 2, *given, cwd=work, check=False)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode != 0 and len(errors) == 1 and says in errors[0], done.stderr[-2000:]
        assert "FSDP" in errors[0]
        assert not [line for line in done.stderr.splitlines() if line.strip().startswith('File "') and "amnesia_sd" in line]
        assert not (work / "refused").exists() and not (work / "refused.partial").exists()


def test_deepspeed_fsdp1_and_fp16_are_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from amnesia_sd.core.errors import UserError
    from amnesia_sd.model.loading import check_sharding

    def accelerator(kind, version=2, precision="no"):
        plugin = SimpleNamespace(fsdp_version=version, cpu_ram_efficient_loading=False)
        return SimpleNamespace(distributed_type=kind, mixed_precision=precision, state=SimpleNamespace(fsdp_plugin=plugin))

    for made, says in ((accelerator(DistributedType.DEEPSPEED), "ZeRO keeps gradients in flat partitioned buffers"),
                       (accelerator(DistributedType.FSDP, version=1), "fsdp_version: 2"),
                       (accelerator(DistributedType.FSDP, precision="fp16"), "--mixed-precision bf16")):
        with pytest.raises(UserError, match=says) as refused:
            check_sharding(made, "forget")
        assert "\n" not in str(refused.value)
    for fine in (accelerator(DistributedType.MULTI_GPU), accelerator(DistributedType.FSDP, precision="bf16")):
        check_sharding(fine, "forget")


def test_a_sharded_checkpoint_index_naming_anything_else_is_refused_unread(tmp_path):
    """torch.distributed.checkpoint reads its .metadata index with plain pickle: forget reads it first
    with an unpickler that builds only checkpoint metadata."""
    import os
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties

    from amnesia_sd.core.errors import UserError
    from amnesia_sd.method.checkpoints import check_sharded_index

    index = tmp_path / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata"
    index.parent.mkdir(parents=True)
    index.write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data={"w": TensorProperties()})))
    check_sharded_index(tmp_path / "checkpoint-4")
    index.write_bytes(pickle.dumps(os.system))  # names a callable: loading it would hand it over
    with pytest.raises(UserError, match=r"\.metadata is not a torch\.distributed\.checkpoint index.*posix\.system"):
        check_sharded_index(tmp_path / "checkpoint-4")
