"""What trains, and how the EWC penalty sees it: the denoiser's own weights (full fine-tuning, the
penalty on theta - theta*) or LoRA adapters on its attention layers (the penalty on the adapter's
update delta W = s B A, the frozen base weight being the anchor). One switch, one training loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import usual_mode
from amnesia_sd.model.ewc import EWCPenalty, LoraPenalty
from amnesia_sd.model.loading import DTYPES, LORA_WEIGHTS, sharded
from amnesia_sd.model.shards import local, rows

# What maps the timestep, SDXL's pooled text and time ids in, and features out: frozen by noxattn.
NOXATTN_FROZEN = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")


def in_method(name: str, method: str) -> bool:
    """Whether a UNet parameter or module belongs to --train-method's part of the UNet: everything,
    all but cross-attention and the embeddings and output layers, or cross-attention (attn2) only:
    the paper's 'full' for celebrities and 'noxattn' for nudity. The same on SD 1.x/2.x and SDXL."""
    if method == "full":
        return True
    if method == "xattn":
        return ".attn2." in f".{name}."
    return ".attn2." not in f".{name}." and not name.startswith(NOXATTN_FROZEN)


def trainable_names(unet, method: str) -> list[str]:
    return [name for name, _ in unet.named_parameters() if in_method(name, method)]


def lora_modules(unet, method: str, targets: list[str]) -> list[str]:
    """The Linear and Conv2d layers that get adapters: those named by --lora-targets inside
    --train-method's part of the UNet. Every target must name at least one."""
    found = {t: [] for t in targets}
    for name, module in unet.named_modules():
        for target in targets:
            if (name == target or name.endswith("." + target)) and in_method(name, method):
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    raise UserError(f"--lora-targets {target}: {name} is a {type(module).__name__}, not a Linear or "
                                    "Conv2d layer; adapters go on those (e.g. to_q,to_k,to_v,to_out.0,proj_in,conv1)")
                found[target].append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise UserError(f"--lora-targets {','.join(missing)} names no layer of this UNet under --train-method "
                        f"{method}; use attention layer names such as to_q,to_k,to_v,to_out.0")
    return sorted({n for names in found.values() for n in names})


def lora_weights(unet, method: str, targets: list[str]) -> list[str]:
    """The weights of the layers LoRA adapts, named as in the UNet without adapters: the Fisher
    entries a LoRA run reads (and all that a LoRA run's own Fisher computes)."""
    return weight_names(lora_modules(unet, method, targets))


def weight_names(modules: list[str]) -> list[str]:
    """The Fisher entries of adapted layers: their weights' names in the denoiser without adapters."""
    return [f"{m}.weight" for m in modules]


def check_rank(unet, modules: list[str], rank: int) -> None:
    """A rank above a layer's smaller side adds parameters and memory without adding anything an
    update of full rank could not hold."""
    layers = dict(unet.named_modules())
    smallest = min(modules, key=lambda m: min(layers[m].weight.shape[0], layers[m].weight[0].numel()))
    side = min(layers[smallest].weight.shape[0], layers[smallest].weight[0].numel())
    if rank > side:
        raise UserError(f"--lora-rank {rank} is more than the smaller side ({side}) of the adapted layer {smallest}: "
                        f"use at most {side} (8 to 64 is usual)")


class FullWeights:
    """Full fine-tuning of the parameters --train-method selects; the anchor theta* is a copy."""

    def __init__(self, unet, config):
        self.config, self.names = config, set(trainable_names(unet, config.train_method))
        unet.requires_grad_(False)
        self.params = [p for n, p in unet.named_parameters() if n in self.names]
        for p in self.params:
            p.requires_grad_(True)
        store = 2 if config.fim_dtype != "fp32" else 4
        self.penalty_bytes = 2 * store * sum(p.numel() for p in self.params)  # F and theta*, whole
        self.penalty = None

    def anchor(self, unet, read_fisher, device) -> None:
        """The penalty, from the weights as they train (after accelerate's prepare: under FSDP their
        shards): theta* copies them, and `read_fisher({name: rows})` gives F for the same rows."""
        config = self.config
        named = [(n, p) for n, p in unet.named_parameters() if n in self.names]
        self.params = [p for _, p in named]
        # fp16 anchors are lossless for fp16 checkpoints, but Fisher values overflow fp16: bf16 then.
        anchor_dtype = DTYPES[config.fim_dtype]
        fisher_dtype = torch.bfloat16 if config.fim_dtype == "fp16" else anchor_dtype
        fisher = read_fisher({n: rows(p) for n, p in named})
        self.penalty = EWCPenalty(self.params, [fisher.pop(n).to(device, fisher_dtype) for n, _ in named],
                                  [local(p).detach().to(anchor_dtype, copy=True) for p in self.params],
                                  config.lambda_ewc)
        with torch.no_grad():  # start exactly at the stored anchor (a no-op in fp32): the penalty starts at zero
            for p, anchor in zip(self.params, self.penalty.anchors):
                local(p).copy_(anchor)
        self.held_bytes = held(self.penalty.fisher + self.penalty.anchors)

    def register_checkpointing(self, accelerator, unet) -> None:
        """accelerate saves and loads the whole UNet itself."""

    def save(self, unet, work: Path, family, state: dict | None = None) -> None:
        """The result's UNet is written with the pipeline (record.py)."""


class LoraAdapters:
    """LoRA adapters (peft, as diffusers' LoRA training) on the selected Linear layers; only they
    train. Only the Fisher entries of adapted weights are loaded, and no anchor is copied."""

    def __init__(self, unet, config):
        from peft import LoraConfig

        self.config = config
        self.modules = lora_modules(unet, config.train_method, config.lora_target_list())
        self.scale = config.lora_alpha_value() / config.lora_rank
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha_value(),
                                    init_lora_weights="gaussian", target_modules=self.modules))
        self.params = self._adapters(unet)
        with torch.no_grad():  # adapters (and their optimizer) in float32 on a 16-bit frozen base (base_dtype)
            for p in self.params:
                p.data = p.data.float()
        layers = dict(unet.named_modules())
        self.penalty_bytes = (2 if config.fim_dtype != "fp32" else 4) * sum(layers[m].weight.numel()
                                                                             for m in self.modules)
        self.penalty = None

    def _adapters(self, unet) -> list[torch.Tensor]:
        layers = dict(unet.named_modules())
        return [p for m in self.modules for p in (layers[m].lora_A["default"].weight, layers[m].lora_B["default"].weight)]

    def anchor(self, unet, read_fisher, device) -> None:
        """The penalty, from the adapters as they train (after accelerate's prepare: under FSDP their
        shards); F of each adapted weight for the rows of B (of delta W) this process holds, named as
        in the UNet without adapters."""
        self.params = self._adapters(unet)
        pairs = list(zip(self.params[::2], self.params[1::2]))
        names = weight_names(self.modules)
        fisher = read_fisher({name: rows(b) for name, (_, b) in zip(names, pairs)})
        fisher_dtype = torch.float32 if self.config.fim_dtype == "fp32" else torch.bfloat16
        entries = [(a, b, fisher.pop(name).to(device, fisher_dtype), self.scale) for name, (a, b) in zip(names, pairs)]
        self.penalty = LoraPenalty(entries, self.config.lambda_ewc)
        self.held_bytes = held([e[2] for e in entries])

    def lora_state(self, unet, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The adapters in peft's layout (<layer>.lora_A/lora_B.weight), with the scale folded into B
        (so alpha = rank: every loader applies it the same way, whatever it assumes about alpha);
        from `state`, the whole denoiser's state dict, when given (gathered from FSDP's shards).
        Not diffusers' convert_state_dict_to_diffusers: it renames only attention layers' keys (to
        lora.down/up), and diffusers' loader then drops those of a file that also has conv layers."""
        from peft.utils import get_peft_model_state_dict

        return {k: (v * self.scale if ".lora_B." in k else v).detach().float().cpu().contiguous()
                for k, v in get_peft_model_state_dict(unet, state_dict=state).items()}

    def register_checkpointing(self, accelerator, unet) -> None:
        """Checkpoints hold the adapters only (megabytes, not the whole UNet). Under FSDP accelerate
        saves every process's shard of the whole denoiser itself (sharded checkpoints), base included."""
        if sharded(accelerator):
            return
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, output_dir):
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(unet)).items()},
                      str(Path(output_dir) / "lora_adapters.safetensors"))
            weights.clear()  # accelerate saves nothing else of the model

        def load_hook(models, input_dir):
            set_peft_model_state_dict(accelerator.unwrap_model(unet),
                                      load_file(str(Path(input_dir) / "lora_adapters.safetensors")))
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def save(self, unet, work: Path, family, state: dict | None = None) -> None:
        family.pipeline_class().save_lora_weights(str(work), **{family.lora_layers: self.lora_state(unet, state)},
                                                  safe_serialization=True)
        usual_mode(work / LORA_WEIGHTS)


def base_dtype(lora: bool, mixed_precision: str) -> torch.dtype:
    """The dtype the base model loads in: float32 when its weights train (and their Fisher is the
    float32 model's); under LoRA, the frozen base (and the Fisher of its adapted layers) in the
    mixed-precision dtype, as diffusers' LoRA scripts load it: FLUX.1's 12B would not fit in float32."""
    return DTYPES[mixed_precision] if lora else torch.float32


def held(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_trainable(unet, config):
    """What trains, before accelerate's prepare; its penalty comes after, with anchor()."""
    return (LoraAdapters if config.lora_rank else FullWeights)(unet, config)
