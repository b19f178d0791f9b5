"""Memory plan: what `forget` holds on the GPU before activations, for the SD v1.4 and SDXL base
UNets per --train-method, the SD3-medium, SD3.5-large and FLUX.1 transformers (--train-method full:
the UNet's xattn/noxattn have no meaning there), and LoRA, with the settings that shrink it.
Computed by the same function as forget's preflight line
(amnesia_sd.model.training_memory.memory_parts) on denoisers built on the meta device (no weights, no
download, seconds), so the docs' tables are the code's.

And, under "fsdp", the per-GPU predicted peak of full-weight forgetting on SDXL and FLUX.1 under
FSDP (full shard, accelerate's transformer-based wrap) at 1, 2, 4 and 8 GPUs: forget's planner
(training_peak with shards=N) at native 1024 px, train batch 1 (+1 replay) per GPU, fp32 weights,
AdamW, --mixed-precision bf16, --gradient-checkpointing, an fp32 and a bf16 Fisher and anchor.

    python benchmarks/memory.py > benchmarks/memory-result.json    # about a minute
"""

from __future__ import annotations

import json

from unets import FLUX1_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, SD14_UNET, SD35_LARGE_TRANSFORMER, SDXL_UNET

GB = 1e9
SETTINGS = {  # name -> (--fim-dtype, --use-8bit-adam)
    "fp32 Fisher, AdamW": ("fp32", False),
    "bf16 Fisher, AdamW": ("bf16", False),
    "bf16 Fisher, 8-bit AdamW": ("bf16", True),
}


def plan(config: dict, denoiser: str = "UNet2DConditionModel", lora_rank: int = 8) -> dict:
    import diffusers
    from accelerate import init_empty_weights

    from amnesia_sd.model.training_memory import fits, memory_parts
    from amnesia_sd.model.trainable import lora_modules, trainable_names

    with init_empty_weights():
        unet = getattr(diffusers, denoiser)(**config)
    sizes = {name: p.numel() for name, p in unet.named_parameters()}
    modules = dict(unet.named_modules())
    n_all = sum(sizes.values())
    rows = {}
    for method in ("full", "noxattn", "xattn") if denoiser == "UNet2DConditionModel" else ("full",):
        n = sum(sizes[k] for k in trainable_names(unet, method))
        rows[method] = {"trained_parameters": n}
        for name, (fim_dtype, adam8) in SETTINGS.items():
            store = 2 if fim_dtype != "fp32" else 4
            total = sum(memory_parts(n_all, n, 2 * store * n, adam8, False).values())
            rows[method][name] = {"gb": round(total / GB, 1), "gpu": fits(total)}
    # LoRA on the default targets: adapters train; the Fisher of the adapted weights, no anchor.
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    adapted = lora_modules(unet, "full", targets)
    n_lora = sum(lora_rank * (modules[m].in_features + modules[m].out_features) for m in adapted)
    n_adapted = sum(sizes[f"{m}.weight"] for m in adapted)
    key = f"lora rank {lora_rank} ({','.join(targets)})"
    rows[key] = {"trained_parameters": n_lora, "adapted_weights": n_adapted}
    for name, (fim_dtype, adam8) in SETTINGS.items():
        store = 2 if fim_dtype != "fp32" else 4
        total = sum(memory_parts(n_all, n_lora, store * n_adapted, adam8, False).values())
        rows[key][name] = {"gb": round(total / GB, 1), "gpu": fits(total)}
    # --mixed-precision bf16: LoRA keeps the frozen base in bf16
    total = sum(memory_parts(n_all, n_lora, 2 * n_adapted, True, False, weight_bytes=2).values())
    rows[key]["bf16 Fisher, 8-bit AdamW, --mixed-precision bf16"] = {"gb": round(total / GB, 1), "gpu": fits(total)}
    return {"denoiser": denoiser, "unet_parameters": n_all, "before_activations": rows}


def fsdp(config: dict, denoiser: str, family: str, image: int = 1024) -> dict:
    import diffusers
    from accelerate import init_empty_weights

    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.model.families import FAMILIES
    from amnesia_sd.model.training_memory import fsdp_units, training_peak

    with init_empty_weights():
        unet = getattr(diffusers, denoiser)(**config)
    largest, root = fsdp_units(unet)
    latent = (image // 8, image // 8)
    rows = {}
    for fim_dtype in ("fp32", "bf16"):
        settings = ForgetConfig(model="m", concept="c", surrogate="s", output_dir="o", train_method="full",
                                train_batch_size=1, fim_dtype=fim_dtype, gradient_checkpointing=True,
                                mixed_precision="bf16")
        rows[f"{fim_dtype} Fisher, AdamW"] = {
            gpus: round(training_peak(FAMILIES[family], unet, settings, latent, "bf16", shards=gpus) / GB, 1)
            for gpus in (1, 2, 4, 8)}
    return {"denoiser": denoiser, "image": image, "largest_unit_parameters": largest, "root_parameters": root,
            "per_gpu_peak_gb": rows}


def main() -> None:
    print(json.dumps({"benchmark": "memory", "gb": "10^9 bytes", "sd14": plan(SD14_UNET), "sdxl": plan(SDXL_UNET),
                      "sd3_medium": plan(SD3_MEDIUM_TRANSFORMER, "SD3Transformer2DModel"),
                      "sd35_large": plan(SD35_LARGE_TRANSFORMER, "SD3Transformer2DModel"),
                      "flux1_dev": plan(FLUX1_TRANSFORMER, "FluxTransformer2DModel"),
                      "fsdp": {"sdxl": fsdp(SDXL_UNET, "UNet2DConditionModel", "sdxl"),
                               "flux1_dev": fsdp(FLUX1_TRANSFORMER, "FluxTransformer2DModel", "flux")}}, indent=2))


if __name__ == "__main__":
    main()
