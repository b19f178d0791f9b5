"""forget and fim under accelerate's FSDP (version 2, full shard), launched with the config file
docs/multi-gpu.md gives users, as 2 processes on the CPU over gloo: the same Fisher, losses and
weights as one process, each process holding half of F and theta*, and an exact resume after a kill."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_command, unet_weights
from launching import assert_same_update, forget_args, kill_at_checkpoint, launch, shared_sets

STEPS = ["--max-train-steps", "4"]


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


def assert_same_run(work, one_dir: str, fsdp_dir: str, model, lora: bool) -> None:
    """An FSDP run and a one-process run of the same global batch: the same losses (the penalty's
    value summed over the processes' parts), the same update (of the weights, or the adapters), each process holding half of what one process holds of F (and theta*), and a
    result plain diffusers reads."""
    one, fsdp = (json.loads((work / d / "amnesia.json").read_text()) for d in (one_dir, fsdp_dir))
    assert (one["distributed"], fsdp["distributed"]) == ("NO", "FSDP")
    assert one["global_batch_size"] == fsdp["global_batch_size"] and fsdp["steps"] == one["steps"]
    assert one["final_losses"]["ewc"] > 1e-3  # past step 1, where the penalty is zero by construction
    for term in ("surrogate", "replay", "ewc"):
        assert fsdp["final_losses"][term] == pytest.approx(one["final_losses"][term], rel=1e-4)
    (whole,), halves = one["penalty_bytes_per_process"], fsdp["penalty_bytes_per_process"]
    assert len(halves) == 2 and sum(halves) == whole and max(halves) <= 0.52 * whole  # rows, rounded per tensor
    assert_same_update(work / one_dir, work / fsdp_dir, None if lora else unet_weights(model))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model if lora else work / fsdp_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(work / fsdp_dir)
        assert sum("lora" in n for n, _ in pipe.unet.named_parameters()) > 0
    else:
        assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], unet_weights(work / fsdp_dir)["conv_in.weight"])
        assert not (work / fsdp_dir / "checkpoints").exists()


def test_lora_forget_under_fsdp_equals_one_process(tiny_model, work):
    extra = ["--lora-rank", "2", "--gradient-accumulation-steps", "2", *STEPS]
    run_command(*forget_args(str(tiny_model), "lora-one", 2, *extra), cwd=work)
    launch("fsdp", 2, *forget_args(str(tiny_model), "lora-fsdp", 1, *extra), cwd=work)
    assert_same_run(work, "lora-one", "lora-fsdp", tiny_model, lora=True)


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


def test_full_weight_forget_under_fsdp_killed_and_resumed_equals_one_process(tiny_model, work):
    args = forget_args(str(tiny_model), "killed", 1, "--max-train-steps", "16", "--checkpointing-steps", "4")
    kept = kill_at_checkpoint("fsdp", args, work, "killed")
    assert kept and kept[-1] >= 8
    checkpoints = work / "killed.partial" / "checkpoints"
    # Sharded: each process wrote its own part of the weights and of the optimizer state.
    assert list((checkpoints / f"checkpoint-{kept[-1]}").glob("pytorch_model_fsdp_0/__1_*.distcp"))
    # Its shards are read only by an FSDP run of as many processes: under DDP the resume is refused.
    from amnesia_sd.core.errors import UserError
    from amnesia_sd.method.checkpoints import CHECKPOINT_SETTINGS, check_resume

    latest = checkpoints / f"checkpoint-{kept[-1]}"
    settings = json.loads((latest / CHECKPOINT_SETTINGS).read_text())
    assert settings["fsdp"] is True and settings["num_processes"] == 2
    with pytest.raises(UserError, match=r"fsdp: True -> None"):
        check_resume(latest, {k: v for k, v in settings.items() if k != "fsdp"})
    launch("fsdp", 2, *args, "--resume-from-checkpoint", "latest", cwd=work)
    run_command(*forget_args(str(tiny_model), "straight", 2, "--max-train-steps", "16"), cwd=work)
    assert_same_run(work, "straight", "killed", tiny_model, lora=False)


def test_fsdp_refusals_are_one_line_before_any_work(tiny_model, work):
    import dataclasses

    from amnesia_sd.commands.forget import check_fsdp
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.core.errors import UserError

    args = forget_args(str(tiny_model), "refused", 1, *STEPS)
    without_fim = args[:args.index("--fim")] + args[args.index("--fim") + 2:]
    done = launch("fsdp", 2, *without_fim, cwd=work, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 1 and "under FSDP without --fim" in errors[0], done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if line.strip().startswith('File "') and "amnesia_sd" in line]
    assert not (work / "refused").exists() and not (work / "refused.partial").exists()
    given = ForgetConfig(model="m", concept="c", surrogate="s", output_dir="o", fim="f.safetensors")
    check_fsdp(given)
    for change, says in (({"ema_decay": 0.999}, "with --ema-decay"), ({"adversarial": True}, "with --adversarial")):
        with pytest.raises(UserError, match=says):
            check_fsdp(dataclasses.replace(given, **change))


def test_deepspeed_fsdp1_and_fp16_are_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from amnesia_sd.core.errors import UserError
    from amnesia_sd.model.loading import check_sharding

    def accelerator(kind, version=2, precision="no"):
        plugin = SimpleNamespace(fsdp_version=version)
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


def test_flux_fisher_under_fsdp_equals_one_process(tiny_flux_model, tmp_path):
    """What FSDP is for (FLUX.1's 12B do not fit one GPU for full-weight forgetting), on a tiny Flux
    transformer (its double and single blocks wrapped): the sharded Fisher equals one process's. 3
    timestep chunks over 2 processes: one makes a pass at weight 0."""
    model = str(tiny_flux_model)
    shared_sets(tiny_flux_model, tmp_path, images=2, timesteps=6, timestep_batch=2)
    launch("fsdp", 2, "fim", "--model", model, "--replay-dir", "replay", "--output", "fim-fsdp.safetensors",
           "--num-timesteps", "6", "--timestep-batch-size", "2", cwd=tmp_path)
    one, fsdp = load_file(str(tmp_path / "fim.safetensors")), load_file(str(tmp_path / "fim-fsdp.safetensors"))
    assert one.keys() == fsdp.keys() and len(one) > 50
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-4, atol=1e-5 * one[k].abs().max().item())
    assert sum(v.sum().item() for v in fsdp.values()) == pytest.approx(sum(v.sum().item() for v in one.values()),
                                                                      rel=1e-5)
