"""The benchmarks run and report what they promise (their figures are measured, not asserted).

Each runs as `python benchmarks/SCRIPT ...` runs it. Those that only compute and print run in this
process (`script`: no Python, torch and diffusers to start again, ~5 s each). Those for which a
process of their own matters run in one (`process`): step.py's worker reports its own peak memory,
gpu_check.py sets the cache folder and wraps library functions, memory_plan.py measures child
processes. The module starts those at its first test, two at a time (each takes a thread or two;
this process meanwhile runs the others), and each test reads its own."""

import contextlib
import io
import json
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import ENV

ROOT = Path(__file__).resolve().parent.parent


def report_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def process(script, *args) -> dict:
    """`python benchmarks/SCRIPT ARGS` in benchmarks/, in a process of its own: its JSON report."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr
    return report_of(done.stdout)


def script(name, *args) -> dict:
    """The same, run in this process as `python` runs it (runpy, as __main__, in benchmarks/ with it
    first on sys.path); the random generator's state and the thread count are restored after."""
    out, threads = io.StringIO(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(), contextlib.redirect_stdout(out):
        patch.chdir(ROOT / "benchmarks")
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        patch.setattr(sys, "argv", [name, *map(str, args)])
        try:
            runpy.run_path(name, run_name="__main__")
        finally:
            torch.set_num_threads(threads)
    return report_of(out.getvalue())


def processes(tiny_model) -> dict[str, list]:
    """The tests whose benchmark runs in a process of its own, and its command, the longest first."""
    return {
        "test_memory_plan_benchmark_code_path_on_cpu": ["memory_plan.py", "--smoke"],
        "test_gpu_check_code_path_on_cpu": ["gpu_check.py", "--smoke"],
        "test_step_benchmark_lora_worker_times_both_lora_steps": [
            # One worker process (seconds): the LoRA SA step alternating with the plain LoRA steps.
            "step.py", "--worker", "--model", tiny_model, "--variant", "lora_sa", "--lora-rank", "4", "--batch", "2",
            "--steps", "1", "--threads", "1"],
        "test_step_benchmark_flux_worker_times_the_sa_step": [
            # A tiny Flux-shaped transformer, one single-stream block fewer (the reduced rows' depth option).
            "step.py", "--worker", "--model", "tiny_flux1", "--num-single-layers", "1", "--variant", "sa",
            "--batch", "1", "--steps", "1", "--latent", "8", "--optimizer", "sgd", "--threads", "1"],
    }


@pytest.fixture(scope="module", autouse=True)
def runs(request, tiny_model):
    """The processes of this module's selected tests, started at its first test, two at a time:
    test name -> future of its report."""
    selected = {item.originalname for item in request.session.items
                if item.module is request.module and not item.get_closest_marker("skip")}
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(process, *command) for name, command in processes(tiny_model).items()
               if name in selected}
    finally:
        pool.shutdown(cancel_futures=True)  # those not started yet, when the module stops early (-x)


@pytest.fixture
def report(runs, request) -> dict:
    """This test's report, from the process that `runs` started for it."""
    return runs[request.node.originalname].result()


def test_gpu_benchmark_code_path_on_cpu():
    report = script("gpu_sd14.py", "--smoke", "--steps", "1")
    assert report["train_images_per_second"] > 0 and set(report["fisher_seconds_per_image"]) == {"20", "5"}


def test_gpu_benchmark_sdxl_code_path_on_cpu():
    report = script("gpu_sd14.py", "--smoke", "--sdxl", "--steps", "1")
    assert report["architecture"] == "sdxl (tiny)" and report["batch"] == "1+1"
    assert report["train_images_per_second"] > 0 and set(report["fisher_seconds_per_image"]) == {"20", "5"}


def test_gpu_benchmark_lora_code_path_on_cpu():
    report = script("gpu_sd14.py", "--smoke", "--lora-rank", "4", "--steps", "1")
    assert report["mode"] == "lora" and report["lora_rank"] == 4 and report["train_images_per_second"] > 0
    assert 0 < report["trainable_parameters"] < report["unet_parameters"] and report["adapters_updated"]


def test_cost_benchmark_multiplies_passes_by_measured_seconds():
    report = script("cost.py", "--smoke", "--repeats", "1")
    tiny = report["models"]["tiny"]
    seconds, table = tiny["seconds_per_pass"], tiny["cost"]["paper"]
    assert table["Fisher"] == {"forward_passes": 0, "forward_backward_passes": 5_000_000, "hours_here": round(
        5_000_000 * seconds["forward_backward_s"] / 3600, 1)}
    assert table["replay set"]["forward_passes"] == 500_000
    assert tiny["cost"]["one-command defaults"]["forgetting"]["forward_backward_passes"] == 8_000


def test_fisher_benchmark_agrees_with_the_reference(tiny_model):
    report = script("fisher.py", "--model", tiny_model, "--samples", "1", "--timesteps", "6", "--subset-samples", "1",
                    "--threads", "1")
    assert report["max_rel_diff"] <= 1e-4 and report["speedup"] > 0
    assert set(report["subset"]) == {"10", "50", "100", "250"}


def test_step_benchmark_lora_worker_times_both_lora_steps(report):
    # step.py --worker, in a process of its own (`processes`): the LoRA SA step alternating with the plain LoRA steps.
    assert all(report[f"{kind}_seconds_per_step"] > 0 for kind in ("lora_sa", "lora_plain", "lora_plain_same_batch"))
    assert 0 < report["trainable_parameters"] < report["unet_parameters"]
    assert report["penalty_state_bytes"] > 0 and report["penalty_seconds_per_step"] > 0


def test_step_benchmark_flux_worker_times_the_sa_step(report):
    # step.py --worker on TINY_FLUX_TRANSFORMER: packed latents, guidance, the flow-matching loss.
    assert report["sa_seconds_per_step"] > 0 and report["plain_seconds_per_step"] > 0
    assert report["trainable_parameters"] == report["unet_parameters"]  # full weights: all of them
    assert report["penalty_state_bytes"] == 2 * report["param_bytes"]  # fp32 F and theta*


def test_step_benchmark_transformer_conditioning_has_the_families_text_lengths():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        from unets import FLUX1_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, random_conditioning
    sd3 = random_conditioning(SD3_MEDIUM_TRANSFORMER, 2, torch.Generator().manual_seed(0), 128)
    assert {k: tuple(v.shape) for k, v in sd3.items()} == {"encoder_hidden_states": (2, 77 + 256, 4096),
                                                            "pooled_projections": (2, 2048)}
    flux = random_conditioning(FLUX1_TRANSFORMER, 2, torch.Generator().manual_seed(0), 128)
    assert tuple(flux["encoder_hidden_states"].shape) == (2, 512, 4096) and flux["guidance"].tolist() == [3.5, 3.5]


@pytest.mark.slow
def test_step_benchmark_reports_ratios(tiny_model):
    # The architecture rows build the full SD v1.4 and SDXL UNets and the SD3 and Flux transformers:
    # minutes and up to ~18 GB each.
    report = process("step.py", "--model", tiny_model, "--skip-sd14", "--skip-sdxl", "--skip-sd3", "--skip-sd3-reduced",
                     "--skip-flux", "--batch", "2", "--steps", "1", "--threads", "1")
    assert {"time_ratio", "extra_peak_mem_over_param_bytes", "time_ratio_bf16"} <= set(report)
    lora = report["lora"]
    assert lora["rank"] == 8 and 0 < lora["trainable_parameters"] < report["trainable_parameters"]
    assert {"lora_time_ratio", "lora_peak_over_full_sa_peak", "lora_time_over_full_sa_time", "lora_sa_peak_rss_gb",
            "full_sa_peak_rss_gb", "lora_sa_seconds_per_step", "lora_plain_seconds_per_step"} <= set(lora)


def test_gpu_check_code_path_on_cpu(report):
    """benchmarks/gpu_check.py --smoke: the one-command forget on tiny SD- and SDXL-shaped models, per
    phase the plan's prediction beside what ran, and the fp16 Fisher against fp32."""
    assert report["device"] == "cpu (smoke)"
    for kind in ("sd14", "sdxl"):
        phases = {row["phase"]: row for row in report[kind]["phases"]}
        assert set(phases) == {"sampling the replay set", "sampling the surrogate set", "the Fisher", "training"}
        assert all(row["predicted_peak_gib"] > 0 and row["unet_passes_per_s"] > 0 for row in phases.values())
        assert report[kind]["mixed_precision"] == "no" and report[kind]["skipped_steps"] == 0
    fisher = report["sd14"]["fp16_vs_fp32_fisher"]
    assert fisher["entries_zeroed_by_fp16"] == 0 and fisher["relative_error"] < 1e-2


def test_memory_plan_benchmark_code_path_on_cpu(report):
    assert report["benchmark"] == "memory_plan" and report["max_relative_error"] >= 0
