"""The benchmarks run and report what they promise (their figures are measured, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ENV

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=ENV, timeout=600, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_gpu_benchmark_code_path_on_cpu():
    report = run("gpu_sd14.py", "--smoke", "--steps", "1")
    assert report["train_images_per_second"] > 0 and set(report["fisher_seconds_per_image"]) == {"20", "5"}


def test_gpu_benchmark_sdxl_code_path_on_cpu():
    report = run("gpu_sd14.py", "--smoke", "--sdxl", "--steps", "1")
    assert report["architecture"] == "sdxl (tiny)" and report["batch"] == "1+1"
    assert report["train_images_per_second"] > 0 and set(report["fisher_seconds_per_image"]) == {"20", "5"}


def test_gpu_benchmark_lora_code_path_on_cpu():
    report = run("gpu_sd14.py", "--smoke", "--lora-rank", "4", "--steps", "1")
    assert report["mode"] == "lora" and report["lora_rank"] == 4 and report["train_images_per_second"] > 0
    assert 0 < report["trainable_parameters"] < report["unet_parameters"] and report["adapters_updated"]


def test_cost_benchmark_multiplies_passes_by_measured_seconds():
    report = run("cost.py", "--smoke", "--repeats", "1")
    tiny = report["models"]["tiny"]
    seconds, table = tiny["seconds_per_pass"], tiny["cost"]["paper"]
    assert table["Fisher"] == {"forward_passes": 0, "forward_backward_passes": 5_000_000, "hours_here": round(
        5_000_000 * seconds["forward_backward_s"] / 3600, 1)}
    assert table["replay set"]["forward_passes"] == 500_000
    assert tiny["cost"]["one-command defaults"]["forgetting"]["forward_backward_passes"] == 8_000


def test_fisher_benchmark_agrees_with_the_reference(tiny_model):
    report = run("fisher.py", "--model", str(tiny_model), "--samples", "1", "--timesteps", "6",
                 "--subset-samples", "1", "--threads", "1")
    assert report["max_rel_diff"] <= 1e-4 and report["speedup"] > 0
    assert set(report["subset"]) == {"10", "50", "100", "250"}


def test_step_benchmark_lora_worker_times_both_lora_steps(tiny_model):
    # One worker process (seconds): the LoRA SA step alternating with the plain LoRA steps.
    report = run("step.py", "--worker", "--model", str(tiny_model), "--variant", "lora_sa", "--lora-rank", "4",
                 "--batch", "2", "--steps", "1", "--threads", "1")
    assert all(report[f"{kind}_seconds_per_step"] > 0 for kind in ("lora_sa", "lora_plain", "lora_plain_same_batch"))
    assert 0 < report["trainable_parameters"] < report["unet_parameters"]
    assert report["penalty_state_bytes"] > 0 and report["penalty_seconds_per_step"] > 0


@pytest.mark.slow
def test_step_benchmark_reports_ratios(tiny_model):
    # The architecture rows build the full SD v1.4 and SDXL UNets: minutes and up to ~18 GB each.
    report = run("step.py", "--model", str(tiny_model), "--skip-sd14", "--skip-sdxl", "--batch", "2", "--steps", "1",
                 "--threads", "1")
    assert {"time_ratio", "extra_peak_mem_over_param_bytes", "time_ratio_bf16"} <= set(report)
    lora = report["lora"]
    assert lora["rank"] == 8 and 0 < lora["trainable_parameters"] < report["trainable_parameters"]
    assert {"lora_time_ratio", "lora_peak_over_full_sa_peak", "lora_time_over_full_sa_time", "lora_sa_peak_rss_gb",
            "full_sa_peak_rss_gb", "lora_sa_seconds_per_step", "lora_plain_seconds_per_step"} <= set(lora)


def test_gpu_check_code_path_on_cpu():
    """benchmarks/gpu_check.py --smoke: the one-command forget on tiny SD- and SDXL-shaped models, per
    phase the plan's prediction beside what ran, and the fp16 Fisher against fp32."""
    report = run("gpu_check.py", "--smoke")
    assert report["device"] == "cpu (smoke)"
    for kind in ("sd14", "sdxl"):
        phases = {row["phase"]: row for row in report[kind]["phases"]}
        assert set(phases) == {"sampling the replay set", "sampling the surrogate set", "the Fisher", "training"}
        assert all(row["predicted_peak_gib"] > 0 and row["unet_passes_per_s"] > 0 for row in phases.values())
        assert report[kind]["mixed_precision"] == "no" and report[kind]["skipped_steps"] == 0
    fisher = report["sd14"]["fp16_vs_fp32_fisher"]
    assert fisher["entries_zeroed_by_fp16"] == 0 and fisher["relative_error"] < 1e-2


def test_memory_plan_benchmark_code_path_on_cpu():
    report = run("memory_plan.py", "--smoke")
    assert report["benchmark"] == "memory_plan" and report["max_relative_error"] >= 0
