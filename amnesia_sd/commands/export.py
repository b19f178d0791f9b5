"""`amnesia-sd export`: a pipeline as one checkpoint in the original layout, the single file
AUTOMATIC1111, Forge and ComfyUI load; with --lora-only, a LoRA result's adapter alone in the layout
those UIs load as a LoRA (kohya's for SD 1.x/2.x and SDXL, diffusers' own for SD 3/3.5 and FLUX.1).

SD 1.x/2.x and SDXL: the whole pipeline, in the original repositories' layout (CompVis LDM for SD
1.x/2.x, Stability's SGM for SDXL):

- `model.diffusion_model.*`: the UNet (input_blocks / middle_block / output_blocks);
- `first_stage_model.*`: the VAE (encoder.down.N.block.M, mid.attn_1 with 1x1-conv weights, ...);
- the text encoder(s): SD 1.x `cond_stage_model.transformer.*` (OpenAI CLIP, Hugging Face layout
  as it is), SD 2.x `cond_stage_model.model.*` (OpenCLIP: q/k/v fused into in_proj), SDXL
  `conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP
  bigG with its text_projection).

SD 3/3.5 and FLUX.1: the transformer alone (the text encoders and the VAE are the base model's,
unchanged by forget), as Stability's sd3_medium.safetensors (`model.diffusion_model.joint_blocks.*`)
and Black Forest Labs' flux1-dev.safetensors (`double_blocks.*`, `single_blocks.*`, no prefix) hold
it: q/k/v fused into one qkv (Flux's single blocks: q/k/v and the MLP's input into linear1), the
adaLN modulations of the final norm (and SD3's last context block) as (shift, scale).

The key maps are the inverse of diffusers' single-file converters (diffusers.loaders.
single_file_utils), derived from the models' configs, so any block layout converts, not only SD
v1.4's. Every parameter must find its place, or nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from amnesia_sd.core.config import _check, _check_choice
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_safetensors
from amnesia_sd.core.paths import Output, _stamped, guard, stamp
from amnesia_sd.method.record import read_record
from amnesia_sd.model.families import FAMILIES, family_of
from amnesia_sd.model.loading import LORA_WEIGHTS, load_pipeline, lora_base, model_path, resolve_model

FORMAT = "amnesia-sd-export"
LORA_FORMAT = "amnesia-sd-export-lora"
METHOD = "Selective Amnesia (Heng & Soh, NeurIPS 2023)"
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
V_PRED_MARKER = "v_pred"  # an empty tensor ComfyUI reads as "this SDXL model predicts v"


@dataclass
class ExportConfig:
    model: str = ""
    output: str = ""
    dtype: str = "fp16"
    lora_only: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.model), "--model is required")
        _check(bool(self.output), "--output is required")
        _check_choice("dtype", self.dtype, tuple(EXPORT_DTYPES))
        _check(Path(self.output).suffix == ".safetensors",
               f"--output {self.output} must end in .safetensors (the format the UIs load)")


# --- the UNet ---------------------------------------------------------------------------------

# A ResBlock's own layers: diffusers name -> original name (both UNet and VAE keep the rest).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# The VAE's mid-block self-attention: Linear layers in diffusers, 1x1 convolutions originally.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_CONV_1X1 = ("q", "k", "v", "proj_out")
KEEP = None  # a module whose parameters keep their names (transformer blocks, plain layers)


def _uniform_layers(config, what: str) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise UserError(f"this {what} has a different number of layers per block ({list(layers)}): the "
                            "original checkpoint layout takes one number for all blocks, so it cannot be exported")
        layers = layers[0]
    return int(layers)


def unet_module_map(config) -> dict[str, tuple[str, dict | None]]:
    """diffusers module path -> (original module path, renames of its own layers or KEEP), as the
    original UNet numbers its blocks: input_blocks.0 is conv_in, then per level `layers_per_block`
    blocks of [ResBlock, SpatialTransformer?] and a Downsample (not after the last level); the
    middle block [ResBlock, SpatialTransformer, ResBlock]; output_blocks per level
    `layers_per_block + 1` blocks of [ResBlock, SpatialTransformer?, Upsample? (last one, not on the
    last level)]."""
    layers = _uniform_layers(config, "UNet")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise UserError(f"this UNet's middle block is a {mid}, not the UNetMidBlock2DCrossAttn of Stable Diffusion "
                        "and SDXL: it has no place in the original checkpoint layout")
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise UserError("this UNet has a class embedding (an upscaler or another variant): only Stable Diffusion "
                        "1.x/2.x and SDXL base UNets can be exported")
    modules: dict[str, tuple[str, dict | None]] = {
        "conv_in": ("input_blocks.0.0", KEEP), "time_embedding.linear_1": ("time_embed.0", KEEP),
        "time_embedding.linear_2": ("time_embed.2", KEEP), "conv_norm_out": ("out.0", KEEP),
        "conv_out": ("out.2", KEEP),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL's added conditioning
        modules["add_embedding.linear_1"] = ("label_emb.0.0", KEEP)
        modules["add_embedding.linear_2"] = ("label_emb.0.2", KEEP)
    down = config["down_block_types"]
    index = 0
    for i, kind in enumerate(down):
        for j in range(layers):
            index += 1
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", UNET_RESNET)
            if "CrossAttn" in kind:
                modules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", KEEP)
        if i < len(down) - 1:
            index += 1
            modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", KEEP)
    modules["mid_block.resnets.0"] = ("middle_block.0", UNET_RESNET)
    modules["mid_block.attentions.0"] = ("middle_block.1", KEEP)
    modules["mid_block.resnets.1"] = ("middle_block.2", UNET_RESNET)
    up = config["up_block_types"]
    index = 0
    for i, kind in enumerate(up):
        attention = "CrossAttn" in kind
        for j in range(layers + 1):
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", UNET_RESNET)
            if attention:
                modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", KEEP)
            if j == layers and i < len(up) - 1:
                modules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{index}.{2 if attention else 1}.conv",
                                                               KEEP)
            index += 1
    return modules


def vae_module_map(config) -> dict[str, tuple[str, dict | None]]:
    """diffusers module path -> (original module path, renames), for the AutoencoderKL: the
    decoder's up blocks are numbered from the lowest resolution in diffusers, from the highest
    originally."""
    levels = len(config["down_block_types"])
    if len(config["up_block_types"]) != levels:
        raise UserError("this VAE's encoder and decoder have different numbers of levels: it is not the "
                        "AutoencoderKL of Stable Diffusion and cannot be exported")
    layers = _uniform_layers(config, "VAE")
    modules: dict[str, tuple[str, dict | None]] = {
        name: (name, KEEP) for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                        "quant_conv", "post_quant_conv")}
    modules["encoder.conv_norm_out"] = ("encoder.norm_out", KEEP)
    modules["decoder.conv_norm_out"] = ("decoder.norm_out", KEEP)
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(levels):
        for j in range(layers):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", KEEP)
        level = levels - 1 - i
        for j in range(layers + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", KEEP)
    return modules


def _no_place(what: str, key: str, like: str = "Stable Diffusion's") -> UserError:
    return UserError(f"the {what} parameter {key} has no place in the original checkpoint layout: this {what} is "
                     f"not shaped like {like} and cannot be exported")


def _rename(state: dict[str, torch.Tensor], modules: dict[str, tuple[str, dict | None]], what: str,
            ) -> dict[str, torch.Tensor]:
    """Every parameter under its original name; one that no module of the map holds is refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:n])
            if module in modules:
                break
        else:
            raise _no_place(what, key)
        target, renames = modules[module]
        rest, leaf = ".".join(parts[n:-1]), parts[-1]
        if renames is not KEEP:
            if rest not in renames:
                raise _no_place(what, key)
            rest = renames[rest]
        name = ".".join(p for p in (target, rest, leaf) if p)
        if renames is VAE_ATTENTION and rest in VAE_CONV_1X1 and leaf == "weight" and value.ndim == 2:
            value = value[:, :, None, None]  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
        if name in out:
            raise UserError(f"two {what} parameters map to {name}: this {what} cannot be exported")
        out[name] = value
    return out


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    return _rename(dict(unet.state_dict()), unet_module_map(unet.config), "UNet")


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    return _rename(dict(vae.state_dict()), vae_module_map(vae.config), "VAE")


# --- the text encoders ------------------------------------------------------------------------

def _hf_clip_state(encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights under the names CLIPTextModel has always had (text_model.*),
    also where transformers >= 5.6 flattened CLIPTextModel."""
    out = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("position_ids"):  # a buffer, not a weight
            continue
        out[key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}"] = value
    return out


def clip_to_original(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): the Hugging Face layout under `prefix`."""
    return {prefix + key: value for key, value in _hf_clip_state(encoder).items()}


OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_original(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): resblocks with q/k/v fused into in_proj, and the
    projection stored as [width, embed] (the transpose of the Linear weight)."""
    state = _hf_clip_state(encoder)
    out: dict[str, torch.Tensor] = {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    layer_prefix = "text_model.encoder.layers."
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith(layer_prefix):
            number, rest = key[len(layer_prefix):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            block = f"{prefix}transformer.resblocks.{number}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{block}attn.in_proj_{leaf}", {})[module[-6]] = value
            elif module in OPEN_CLIP_LAYER:
                out[f"{block}{OPEN_CLIP_LAYER[module]}.{leaf}"] = value
            else:
                raise UserError(f"the text encoder parameter {key} has no place in the OpenCLIP layout: this text "
                                "encoder cannot be exported")
        else:
            raise UserError(f"the text encoder parameter {key} has no place in the OpenCLIP layout: this text "
                            "encoder cannot be exported")
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"{name}: the text encoder lacks one of q/k/v and cannot be exported")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def is_open_clip(encoder) -> bool:
    """OpenCLIP text towers (SD 2.x's ViT-H, SDXL's bigG) use the exact GELU; OpenAI's CLIP (SD 1.x)
    the quick GELU. The original layouts follow the same split: an SD 2.x checkpoint is told from an
    SD 1.x one by its cond_stage_model.model.* keys, which load into an OpenCLIP tower."""
    return getattr(encoder.config, "hidden_act", "quick_gelu") != "quick_gelu"


# --- the transformers (SD 3/3.5, FLUX.1) ------------------------------------------------------

# original key -> (the diffusers keys it holds, concatenated on dim 0 in this order; whether its two
# halves swap: the original final adaLN modulation is (shift, scale), diffusers' AdaLayerNormContinuous
# (scale, shift)).
Plan = dict[str, tuple[tuple[str, ...], bool]]
LINEAR = {"weight": "weight", "bias": "bias"}  # diffusers leaf -> original leaf
SD3_NORM = {"weight": "weight"}  # the RMSNorms of q and k (SD 3.5's qk norm)
FLUX_NORM = {"weight": "scale"}


def _place(plan: Plan, original: str, *modules: str, leaves: dict = LINEAR, swap: bool = False) -> None:
    """The original module's parameters hold those of the diffusers `modules` (several: fused, in order)."""
    for leaf, original_leaf in leaves.items():
        plan[f"{original}.{original_leaf}"] = (tuple(f"{m}.{leaf}" for m in modules), swap)


def sd3_plan(config) -> Plan:
    """SD3Transformer2DModel -> MMDiT (inverse of convert_sd3_transformer_checkpoint_to_diffusers): joint
    blocks of an x_block and a context_block; the last context block only feeds the attention (no
    output projection, no MLP; its modulation in the original order); SD 3.5's qk norms (ln_q/ln_k)
    and dual-attention blocks (x_block.attn2)."""
    plan: Plan = {"pos_embed": (("pos_embed.pos_embed",), False)}
    for original, module in (("x_embedder.proj", "pos_embed.proj"),
                             ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                             ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                             ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                             ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                             ("context_embedder", "context_embedder"), ("final_layer.linear", "proj_out")):
        _place(plan, original, module)
    _place(plan, "final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    layers = config.num_layers
    dual = set(config.get("dual_attention_layers") or ())
    for i in range(layers):
        last = i == layers - 1
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        _place(plan, f"{x}attn.qkv", f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v")
        _place(plan, f"{c}attn.qkv", f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj")
        _place(plan, f"{x}attn.proj", f"{d}attn.to_out.0")
        _place(plan, f"{x}adaLN_modulation.1", f"{d}norm1.linear")
        _place(plan, f"{c}adaLN_modulation.1", f"{d}norm1_context.linear", swap=last)
        _place(plan, f"{x}mlp.fc1", f"{d}ff.net.0.proj")
        _place(plan, f"{x}mlp.fc2", f"{d}ff.net.2")
        if not last:
            _place(plan, f"{c}attn.proj", f"{d}attn.to_add_out")
            _place(plan, f"{c}mlp.fc1", f"{d}ff_context.net.0.proj")
            _place(plan, f"{c}mlp.fc2", f"{d}ff_context.net.2")
        if config.get("qk_norm"):
            for block, q, k in ((x, "norm_q", "norm_k"), (c, "norm_added_q", "norm_added_k")):
                _place(plan, f"{block}attn.ln_q", f"{d}attn.{q}", leaves=SD3_NORM)
                _place(plan, f"{block}attn.ln_k", f"{d}attn.{k}", leaves=SD3_NORM)
        if i in dual:
            _place(plan, f"{x}attn2.qkv", f"{d}attn2.to_q", f"{d}attn2.to_k", f"{d}attn2.to_v")
            _place(plan, f"{x}attn2.proj", f"{d}attn2.to_out.0")
            if config.get("qk_norm"):
                _place(plan, f"{x}attn2.ln_q", f"{d}attn2.norm_q", leaves=SD3_NORM)
                _place(plan, f"{x}attn2.ln_k", f"{d}attn2.norm_k", leaves=SD3_NORM)
    return plan


def flux_plan(config) -> Plan:
    """FluxTransformer2DModel -> Black Forest Labs' Flux (inverse of
    convert_flux_transformer_checkpoint_to_diffusers): double blocks with image and text streams,
    single blocks whose linear1 is q, k, v and the MLP's input side by side; dev's guidance_in."""
    plan: Plan = {}
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.get("guidance_embeds"):
        embedders.append(("guidance_in", "guidance_embedder"))
    for original, module in embedders:
        _place(plan, f"{original}.in_layer", f"time_text_embed.{module}.linear_1")
        _place(plan, f"{original}.out_layer", f"time_text_embed.{module}.linear_2")
    for original, module in (("txt_in", "context_embedder"), ("img_in", "x_embedder"),
                             ("final_layer.linear", "proj_out")):
        _place(plan, original, module)
    _place(plan, "final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    for i in range(config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _place(plan, f"{o}img_mod.lin", f"{d}norm1.linear")
        _place(plan, f"{o}txt_mod.lin", f"{d}norm1_context.linear")
        _place(plan, f"{o}img_attn.qkv", f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v")
        _place(plan, f"{o}txt_attn.qkv", f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj")
        _place(plan, f"{o}img_attn.norm.query_norm", f"{d}attn.norm_q", leaves=FLUX_NORM)
        _place(plan, f"{o}img_attn.norm.key_norm", f"{d}attn.norm_k", leaves=FLUX_NORM)
        _place(plan, f"{o}txt_attn.norm.query_norm", f"{d}attn.norm_added_q", leaves=FLUX_NORM)
        _place(plan, f"{o}txt_attn.norm.key_norm", f"{d}attn.norm_added_k", leaves=FLUX_NORM)
        _place(plan, f"{o}img_attn.proj", f"{d}attn.to_out.0")
        _place(plan, f"{o}txt_attn.proj", f"{d}attn.to_add_out")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            _place(plan, f"{o}{stream}_mlp.0", f"{d}{ff}.net.0.proj")
            _place(plan, f"{o}{stream}_mlp.2", f"{d}{ff}.net.2")
    for i in range(config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _place(plan, f"{o}modulation.lin", f"{d}norm.linear")
        _place(plan, f"{o}linear1", f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp")
        _place(plan, f"{o}norm.query_norm", f"{d}attn.norm_q", leaves=FLUX_NORM)
        _place(plan, f"{o}norm.key_norm", f"{d}attn.norm_k", leaves=FLUX_NORM)
        _place(plan, f"{o}linear2", f"{d}proj_out")
    return plan


def _assemble(state: dict[str, torch.Tensor], plan: Plan, what: str, like: str) -> dict[str, torch.Tensor]:
    """Every original tensor of `plan` from the diffusers parameters it holds; a parameter no entry
    holds, or one an entry needs that the model lacks, is refused."""
    held = {key for sources, _ in plan.values() for key in sources}
    for key in state:
        if key not in held:
            raise _no_place(what, key, like)
    out: dict[str, torch.Tensor] = {}
    for name, (sources, swap) in plan.items():
        missing = next((key for key in sources if key not in state), None)
        if missing:
            raise UserError(f"this {what} has no {missing}, which the original layout's {name} holds: it is not "
                            f"shaped like {like} and cannot be exported")
        value = torch.cat([state[key] for key in sources]) if len(sources) > 1 else state[sources[0]]
        if swap:
            first, second = value.chunk(2)
            value = torch.cat([second, first])
        out[name] = value
    return out


# family -> (its plan, the key prefix of its original single file, the layout's name)
TRANSFORMER_LAYOUTS = {"sd3": (sd3_plan, UNET_PREFIX, "sd3-transformer"), "flux": (flux_plan, "", "flux-transformer")}


def transformer_to_original(transformer, family) -> tuple[dict[str, torch.Tensor], str]:
    """An SD 3/3.5 or FLUX.1 transformer under its original names, and the layout."""
    plan, prefix, layout = TRANSFORMER_LAYOUTS[family.name]
    tensors = _assemble(dict(transformer.state_dict()), plan(transformer.config), "transformer", f"{family.title}'s")
    return {prefix + key: value for key, value in tensors.items()}, layout


# --- the pipeline -----------------------------------------------------------------------------

def pipeline_to_original(pipe) -> tuple[dict[str, torch.Tensor], str]:
    """The pipeline's weights under their original names, and the layout: "sd1", "sd2" or "sdxl" (the
    whole pipeline), "sd3-transformer" or "flux-transformer" (the transformer alone)."""
    family = family_of(pipe)  # refuses any other pipeline class
    if family.name in TRANSFORMER_LAYOUTS:
        return transformer_to_original(pipe.transformer, family)
    for name in ("unet", "vae", *family.text_encoders):
        if getattr(pipe, name, None) is None:
            raise UserError(f"this pipeline has no {name}: a checkpoint needs all of the UNet, the VAE and the "
                            "text encoder(s)")
    tensors = {UNET_PREFIX + k: v for k, v in unet_to_original(pipe.unet).items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_to_original(pipe.vae).items()})
    if family.name == "sdxl":
        layout = "sdxl"
        tensors.update(clip_to_original(pipe.text_encoder, SDXL_TEXT[0]))
        if not hasattr(pipe.text_encoder_2, "text_projection"):
            raise UserError("SDXL's second text encoder has no text_projection: it cannot be exported")
        tensors.update(open_clip_to_original(pipe.text_encoder_2, SDXL_TEXT[1]))
    elif is_open_clip(pipe.text_encoder):
        layout = "sd2"
        tensors.update(open_clip_to_original(pipe.text_encoder, SD2_TEXT))
    else:
        layout = "sd1"
        tensors.update(clip_to_original(pipe.text_encoder, SD1_TEXT))
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        tensors[V_PRED_MARKER] = torch.zeros(0)
    return tensors, layout


def _amnesia_record(location: Path) -> dict | None:
    """A forget result's record; None for a plain pipeline, or a record that is malformed or not ours."""
    try:
        record = read_record(str(location))
    except UserError:
        return None
    return record if record and _stamped(record) else None


def _result_metadata(record: dict | None) -> dict[str, str]:
    """What the file says about the forgetting it carries (nothing for a plain pipeline)."""
    if not record:
        return {}
    return {"base_model": str(record.get("base_model", "")), "forgotten_concepts": json.dumps(record.get("concepts", [])),
            "method": METHOD, "settings": json.dumps(record.get("settings", {}), default=str)}


def _guard(config: ExportConfig, inputs: dict) -> Path:
    output = Path(config.output)
    guard([Output("--output", output, None, "export", (FORMAT, LORA_FORMAT))], inputs, config.overwrite)
    return output


def _lora_base_path(location: Path) -> Path | None:
    """The local base model a LoRA result builds on (an input the output may not replace)."""
    try:
        base = lora_base(location)
        return model_path(base) if base else None
    except UserError:
        return None


def export(config: ExportConfig) -> Path:
    """`amnesia-sd export`: the model (a forget result, a LoRA result merged into its base, or any
    supported pipeline) as one original-layout .safetensors checkpoint: the whole pipeline for SD
    1.x/2.x and SDXL, the transformer alone for SD 3/3.5 and FLUX.1."""
    if config.lora_only:
        return export_lora(config)

    ref = resolve_model(config.model)
    location = Path(ref.location) if ref.kind in ("folder", "lora") else None
    output = _guard(config, {"--model": model_path(config.model),
                             "the LoRA's base model": _lora_base_path(location) if ref.kind == "lora" else None})
    dtype = EXPORT_DTYPES[config.dtype]
    # A LoRA is merged at full precision, then rounded once; other weights load straight in the
    # export's dtype (the same rounding as after an fp32 load, in half the memory: FLUX.1 is 12B).
    pipe = load_pipeline(ref, torch.float32 if ref.kind == "lora" else dtype)
    family = family_of(pipe)
    tensors, layout = pipeline_to_original(pipe)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() and k != V_PRED_MARKER else v).contiguous()
               for k, v in tensors.items()}
    record = _amnesia_record(location) if location else None

    metadata = {**stamp(), "format": FORMAT, "architecture": family.name, "layout": layout,
                "prediction_type": family.prediction_type(pipe),
                "dtype": config.dtype, "model": ref.identity, **_result_metadata(record)}

    write_safetensors(output, tensors, metadata)
    return output


# --- --lora-only ------------------------------------------------------------------------------

LORA_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")
LORA_UP = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight")


def lora_pairs(state: dict[str, torch.Tensor], denoiser: str) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers LoRA file (<denoiser>.<module>.lora_A/lora_B.weight, or the older lora.down/up names)
    as module -> {"down": A, "up": B}; anything else in it is refused."""
    prefix = denoiser + "."
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            what = {"unet": "UNet"}.get(denoiser, denoiser)
            raise UserError(f"the LoRA file holds {key}, not a {what} adapter: only {what} LoRAs (what forget trains) "
                            "can be exported with --lora-only")
        for side, endings in (("down", LORA_DOWN), ("up", LORA_UP)):
            ending = next((e for e in endings if key.endswith(e)), None)
            if ending:
                pairs.setdefault(key[len(prefix):-len(ending)], {})[side] = value
                break
        else:
            raise UserError(f"the LoRA file holds {key}, which is neither a LoRA down nor up weight: it cannot be "
                            "exported")
    for module, parts in pairs.items():
        if set(parts) != {"down", "up"}:
            raise UserError(f"the LoRA of {module} lacks its {'up' if 'down' in parts else 'down'} weight")
    return dict(sorted(pairs.items()))


def lora_to_kohya(state: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """diffusers' LoRA layout (unet.<module>.lora_A/lora_B) as kohya's: lora_unet_<module with _>
    .lora_down/.lora_up and .alpha (the scale is alpha / rank; `alpha` None: the rank, scale 1)."""
    out: dict[str, torch.Tensor] = {}
    for module, parts in lora_pairs(state, "unet").items():
        name = "lora_unet_" + module.replace(".", "_")
        rank = parts["down"].shape[0]
        out[f"{name}.lora_down.weight"] = parts["down"]
        out[f"{name}.lora_up.weight"] = parts["up"]
        out[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return out


def lora_to_diffusers(state: dict[str, torch.Tensor], denoiser: str) -> dict[str, torch.Tensor]:
    """An SD 3/3.5 or FLUX.1 LoRA in diffusers' layout (transformer.<module>.lora_A/lora_B.weight, no
    alpha: scale 1, forget folds its scale into B), which ComfyUI and Forge load for these models as
    diffusers' own loader does: they map each diffusers module onto their fused qkv / linear1 rows,
    which kohya's names have no way to say."""
    return {f"{denoiser}.{module}.lora_{'A' if side == 'down' else 'B'}.weight": value
            for module, parts in lora_pairs(state, denoiser).items() for side, value in sorted(parts.items())}


def export_lora(config: ExportConfig) -> Path:
    """`amnesia-sd export --lora-only`: a LoRA result's adapter alone, in the kohya layout (SD 1.x/2.x,
    SDXL) or diffusers' (SD 3/3.5, FLUX.1)."""
    from safetensors.torch import load_file

    location = Path(config.model).expanduser()
    record = _amnesia_record(location) if location.is_dir() else None
    if not record or "lora" not in record or not (location / LORA_WEIGHTS).is_file():
        raise UserError(f"--lora-only needs a LoRA result of `amnesia-sd forget --lora-rank N`, and {config.model} "
                        f"is not one (no amnesia.json with a lora entry and {LORA_WEIGHTS}): export the whole "
                        "checkpoint without --lora-only")
    family = FAMILIES.get(str(record.get("architecture")), FAMILIES["sd"])
    output = _guard(config, {"--model": location, "the LoRA's base model": _lora_base_path(location)})
    lora = record["lora"] if isinstance(record["lora"], dict) else {}
    alpha = lora.get("alpha")
    dtype = EXPORT_DTYPES[config.dtype]
    state = load_file(str(location / LORA_WEIGHTS))
    if family.denoiser == "unet":
        layout, tensors = "kohya", lora_to_kohya(state, alpha)
    else:
        layout, tensors = "diffusers", lora_to_diffusers(state, family.denoiser)
    tensors = {k: (v if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()}
    ranks = sorted({v.shape[0] for k, v in tensors.items() if k.endswith(LORA_DOWN)})
    metadata = {**stamp(), "format": LORA_FORMAT, "architecture": str(record.get("architecture", "")),
                "layout": layout, "dtype": config.dtype, "model": str(location.resolve()), **_result_metadata(record),
                "lora": json.dumps(lora, default=str),
                # what kohya's scripts write, and the UIs show
                **({"ss_network_module": "networks.lora"} if layout == "kohya" else {}),
                "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
                "ss_network_alpha": str(alpha if alpha is not None else ranks[0] if len(ranks) == 1 else "rank")}
    write_safetensors(output, tensors, metadata)
    return output
