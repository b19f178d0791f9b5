"""`amnesia-sd export`: one original-layout checkpoint that diffusers' own single-file loader (and so
AUTOMATIC1111 / ComfyUI, which read the same layout) turns back into exactly the same weights; and
--lora-only, a kohya-layout LoRA that diffusers' LoRA loader merges into exactly the same delta."""

import copy
import hashlib
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.commands.export import (ExportConfig, export as export_command, pipeline_to_original, unet_module_map,
                                        unet_to_original)
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.paths import stamp
from helpers import run_command

PARTS = {StableDiffusionPipeline: ("unet", "vae", "text_encoder"),
         StableDiffusionXLPipeline: ("unet", "vae", "text_encoder", "text_encoder_2")}


def load(cls, path):
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    return cls.from_pretrained(path, **extra)


def load_single_file(cls, path, config):
    """diffusers' own reader of original-layout checkpoints, offline: the components' configs come from
    the pipeline folder (`config`), only the weights from the file."""
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    return cls.from_single_file(str(path), config=str(config), local_files_only=True, **extra)


def assert_same_weights(source, loaded, dtype):
    """Every weight of `loaded` is the source's, rounded to `dtype` (exactly equal at fp32)."""
    a, b = source.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert not b[key].is_meta, f"{key} was not in the checkpoint"
        assert torch.equal(a[key].to(dtype).float(), b[key].float()), key


def export(model, out, *, dtype="fp32", **kwargs):
    return export_command(ExportConfig(model=str(model), output=str(out), dtype=dtype, **kwargs))


def keys_and_metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}, f.metadata()


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_sd2_model(tiny_vpred_model, tmp_path_factory):
    """SD 2.x-shaped: v-prediction, linear projections in the transformers, and a text encoder with
    OpenCLIP's exact GELU (the tiny fixtures' text encoders are OpenAI-CLIP-like, quick GELU, so
    they export in the SD 1.x layout; this one must take the OpenCLIP layout)."""
    pipe = load(StableDiffusionPipeline, tiny_vpred_model)
    torch.manual_seed(1)
    config = copy.deepcopy(pipe.text_encoder.config)
    config.hidden_act = "gelu"
    pipe.register_modules(text_encoder=CLIPTextModel(config),
                          unet=UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True}))
    path = tmp_path_factory.mktemp("tiny-sd2") / "sd2"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_sdxl_wide_model(tiny_sdxl_model, tmp_path_factory):
    """SDXL-shaped with the second text encoder wider than the first (48 vs 32, as bigG's 1280 vs
    CLIP-L's 768). diffusers' single-file reader picks the checkpoint's encoder for text_encoder_2 by
    width: with both 32 wide, as in the tiny_sdxl_model fixture, it reads CLIP-L's weights into it."""
    pipe = load(StableDiffusionXLPipeline, tiny_sdxl_model)
    torch.manual_seed(2)
    pipe.register_modules(
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=pipe.text_encoder_2.config.vocab_size, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=24, hidden_act="gelu")),
        unet=UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48}))
    path = tmp_path_factory.mktemp("tiny-xl-wide") / "sdxl"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
@pytest.mark.parametrize("name", ["tiny_model", "tiny_vpred_model", "tiny_sd2_model", "tiny_sdxl_wide_model"])
def test_from_single_file_reads_back_the_same_weights(name, dtype, torch_dtype, request, tmp_path):
    model = request.getfixturevalue(name)
    cls = StableDiffusionXLPipeline if "sdxl" in name else StableDiffusionPipeline
    out = export(model, tmp_path / "model.safetensors", dtype=dtype)
    keys, metadata = keys_and_metadata(out)
    source, loaded = load(cls, model), load_single_file(cls, out, model)
    for part in PARTS[cls]:
        assert_same_weights(getattr(source, part), getattr(loaded, part), torch_dtype)
    # prediction_type is the config folder's; the file says it too (and carries ComfyUI's v_pred marker)
    assert loaded.scheduler.config.prediction_type == source.scheduler.config.prediction_type
    v = source.scheduler.config.prediction_type == "v_prediction"
    assert metadata["prediction_type"] == source.scheduler.config.prediction_type and ("v_pred" in keys) == v
    assert {d for k, d in keys.items() if k != "v_pred"} == {"F32" if dtype == "fp32" else "F16"}
    layout = {"tiny_model": "sd1", "tiny_vpred_model": "sd1", "tiny_sd2_model": "sd2", "tiny_sdxl_wide_model": "sdxl"}
    assert metadata["layout"] == layout[name]
    assert metadata["architecture"] == ("sdxl" if "sdxl" in name else "sd")
    assert metadata["format"] == "amnesia-sd-export" and metadata["tool"] == "amnesia-sd"
    assert "forgotten_concepts" not in metadata  # a plain pipeline
    text = {"sd1": ["cond_stage_model.transformer.text_model."], "sd2": ["cond_stage_model.model."],
            "sdxl": ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."]}[layout[name]]
    for prefix in ("model.diffusion_model.", "first_stage_model.", *text):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", *text)) for k in keys if k != "v_pred")


def test_original_names(tiny_model, tiny_sd2_model, tiny_sdxl_wide_model, tmp_path):
    """Spot checks of the layout the UIs read: LDM/SGM block numbering, the VAE's 1x1-conv attention,
    OpenCLIP's fused in_proj and transposed projection."""
    sd1, _ = keys_and_metadata(export(tiny_model, tmp_path / "sd1.safetensors"))
    # two levels, one layer each: input_blocks 1 (level 0, with attention), 2 (downsample), 3 (level 1)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.input_blocks.3.0.in_layers.2.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",  # level 1 has no attention: Upsample is .1
                "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
                "model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.2.bias",
                "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.decoder.up.1.upsample.conv.weight",
                "first_stage_model.decoder.up.0.block.1.conv2.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.post_quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"):
        assert key in sd1, key
    with safe_open(str(tmp_path / "sd1.safetensors"), framework="pt") as f:
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape() == [32, 32, 1, 1]
    sd2, _ = keys_and_metadata(export(tiny_sd2_model, tmp_path / "sd2.safetensors"))
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in sd2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)
    xl_path = export(tiny_sdxl_wide_model, tmp_path / "xl.safetensors")
    xl, _ = keys_and_metadata(xl_path)
    with safe_open(str(xl_path), framework="pt") as f:
        assert f.get_slice("conditioner.embedders.1.model.text_projection").get_shape() == [48, 24]  # [width, embed]
        assert f.get_slice("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight").get_shape() == [144, 48]
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn1.to_q.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.weight"):
        assert key in xl, key


def test_the_sdxl_fixture(tiny_sdxl_model, tmp_path):
    """The tiny SDXL fixture itself: UNet, VAE and CLIP-L through from_single_file; its second
    encoder (as wide as the first, which from_single_file cannot tell apart) through the function
    from_single_file reads a real SDXL's OpenCLIP bigG with."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    out = export(tiny_sdxl_model, tmp_path / "xl.safetensors")
    source = load(StableDiffusionXLPipeline, tiny_sdxl_model)
    loaded = load_single_file(StableDiffusionXLPipeline, out, tiny_sdxl_model)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(source, part), getattr(loaded, part), torch.float32)
    with safe_open(str(out), framework="pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys()}
    read = convert_open_clip_checkpoint(source.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model.")
    expected = source.text_encoder_2.state_dict()
    assert read.keys() == expected.keys()
    assert all(torch.equal(read[k], expected[k]) for k in expected)


def forget_result(model, root):
    """A forget result as `forget` leaves it: the pipeline and amnesia.json."""
    out = root / "result"
    shutil.copytree(model, out)
    record = {**stamp(), "method": "Selective Amnesia (Heng & Soh, NeurIPS 2023)", "base_model": str(model),
              "architecture": "sd", "concepts": ["brad pitt", "pitt"], "settings": {"lambda_ewc": 50.0, "seed": 0}}
    (out / "amnesia.json").write_text(json.dumps(record))
    return out


def test_metadata_of_a_forget_result(tiny_model, tmp_path):
    path = export(forget_result(tiny_model, tmp_path), tmp_path / "x.safetensors", dtype="bf16")
    keys, metadata = keys_and_metadata(path)
    assert set(keys.values()) == {"BF16"}
    assert metadata["tool"] == "amnesia-sd" and metadata["format"] == "amnesia-sd-export"
    assert metadata["base_model"] == str(tiny_model) and metadata["architecture"] == "sd"
    assert json.loads(metadata["forgotten_concepts"]) == ["brad pitt", "pitt"]
    assert metadata["method"] == "Selective Amnesia (Heng & Soh, NeurIPS 2023)"
    assert json.loads(metadata["settings"]) == {"lambda_ewc": 50.0, "seed": 0}


def test_refuses_what_it_cannot_convert(tiny_model, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unconditional = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                                                  layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                                  up_block_types=("UpBlock2D",) * 2), scheduler=DDPMScheduler())
    with pytest.raises(UserError, match="DDPMPipeline is not supported"):
        pipeline_to_original(unconditional)
    config = dict(UNet2DConditionModel.load_config(tiny_model, subfolder="unet"))
    with pytest.raises(UserError, match="middle block"):
        unet_module_map({**config, "mid_block_type": None})
    with pytest.raises(UserError, match="layers per block"):
        unet_module_map({**config, "layers_per_block": (1, 2)})
    with pytest.raises(UserError, match="class embedding"):
        unet_to_original(UNet2DConditionModel.from_config({**config, "class_embed_type": "timestep"}))
    unet = UNet2DConditionModel.from_config(config)
    unet.register_buffer("extra", torch.zeros(1))  # a parameter the original layout has no place for
    with pytest.raises(UserError, match="UNet parameter extra has no place"):
        unet_to_original(unet)
    for bad, message in (({"dtype": "fp8"}, "--dtype"), ({"output": "x.ckpt"}, ".safetensors")):
        with pytest.raises(UserError, match=message):
            ExportConfig(**{"model": str(tiny_model), "output": "x.safetensors", **bad})
    assert not list(tmp_path.glob("*.safetensors"))


def test_never_replaces_a_users_file(tiny_model, tmp_path):
    theirs = tmp_path / "theirs.safetensors"
    save_file({"w": torch.ones(3)}, str(theirs), metadata={"tool": "someone else"})
    before = sha(theirs)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not an amnesia-sd export"):
            export(tiny_model, theirs, overwrite=overwrite)
        assert sha(theirs) == before
    inside = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    before = sha(inside)
    with pytest.raises(UserError, match="may not be, contain or lie inside an input"):
        export(tiny_model, inside, overwrite=True)
    assert sha(inside) == before
    ours = export(tiny_model, tmp_path / "ours.safetensors")
    with pytest.raises(UserError, match="pass --overwrite"):
        export(tiny_model, ours, dtype="fp16")
    assert keys_and_metadata(ours)[1]["dtype"] == "fp32"
    export(tiny_model, ours, dtype="fp16", overwrite=True)
    assert keys_and_metadata(ours)[1]["dtype"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]


def make_lora_result(cls, model, out, architecture):
    """A LoRA result of forget: diffusers' LoRA file (alpha = rank, scale 1) and amnesia.json; returns
    it with each adapted layer's delta B @ A."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load(cls, model).unet
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    deltas = {}
    with torch.no_grad():
        for name, module in unet.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.1)  # B starts at zero: make the delta real
                deltas[name + ".weight"] = module.lora_B["default"].weight @ module.lora_A["default"].weight
    cls.save_lora_weights(str(out), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    (out / "amnesia.json").write_text(json.dumps({
        "tool": "amnesia-sd", "base_model": str(model), "architecture": architecture, "lora": {"rank": 4, "alpha": 4},
        "concepts": ["x"], "settings": {}}))
    return out, deltas


def assert_merged(cls, model, lora_file, deltas):
    """diffusers' LoRA loader merges the file into the base UNet as base + B @ A, nothing else."""
    pipe = load(cls, model)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    assert fused.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(fused[key], base[key] + deltas.get(key, 0), rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def lora_result(tiny_model, tmp_path_factory):
    return make_lora_result(StableDiffusionPipeline, tiny_model, tmp_path_factory.mktemp("lora") / "forgotten", "sd")


def test_lora_only_loads_as_a_kohya_lora(lora_result, tiny_model, tmp_path):
    result, deltas = lora_result
    path = export(result, tmp_path / "kohya" / "forgotten-lora.safetensors", lora_only=True)
    keys, metadata = keys_and_metadata(path)
    assert len(deltas) == 32 and len(keys) == 3 * len(deltas)
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v.alpha"} <= keys.keys()
    assert metadata["format"] == "amnesia-sd-export-lora" and json.loads(metadata["forgotten_concepts"]) == ["x"]
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert_merged(StableDiffusionPipeline, tiny_model, path, deltas)


def test_lora_only_of_an_sdxl_result(tiny_sdxl_model, tmp_path):
    result, deltas = make_lora_result(StableDiffusionXLPipeline, tiny_sdxl_model, tmp_path / "forgotten", "sdxl")
    path = export(result, tmp_path / "forgotten-lora.safetensors", lora_only=True)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys_and_metadata(path)[0]
    assert_merged(StableDiffusionXLPipeline, tiny_sdxl_model, path, deltas)


def test_whole_export_of_a_lora_result_is_merged(lora_result, tiny_model, tmp_path):
    result, deltas = lora_result
    path = export(result, tmp_path / "merged.safetensors")
    assert json.loads(keys_and_metadata(path)[1]["forgotten_concepts"]) == ["x"]
    loaded = load_single_file(StableDiffusionPipeline, path, tiny_model).unet.state_dict()
    base = load(StableDiffusionPipeline, tiny_model).unet.state_dict()
    for key in base:
        torch.testing.assert_close(loaded[key], base[key] + deltas.get(key, 0), rtol=1e-5, atol=1e-6, msg=key)


def test_lora_only_needs_a_lora_result(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_model), "--output",
                                      str(tmp_path / "x.safetensors"), "--lora-only"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --lora-only needs a LoRA result"), result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_cli(tiny_model, tmp_path):
    # In this process (helpers.run_command: the app the installed command calls), a relative --output.
    done = run_command("export", "--model", tiny_model, "--output", "sd.safetensors", cwd=tmp_path)  # exit code 0
    assert "checkpoint written to sd.safetensors" in done.stdout
    keys, metadata = keys_and_metadata(tmp_path / "sd.safetensors")
    assert metadata["dtype"] == "fp16" and set(keys.values()) == {"F16"} and metadata["layout"] == "sd1"
