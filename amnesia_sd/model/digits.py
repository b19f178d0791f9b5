"""The embedded default model: a tiny Stable Diffusion trained on scikit-learn's handwritten digits.

Selective Amnesia's class-conditional experiments forget one digit and judge the result with a
digit classifier. This module gives amnesia-sd the same setting with nothing to download: it
trains a small text-to-image model with the real Stable Diffusion architecture (VAE, CLIP text
encoder, conditional UNet, DDPM noise schedule) on the 1,797 8x8 digits that scikit-learn ships,
saves it as an ordinary diffusers `StableDiffusionPipeline` folder, and provides a classifier
trained on the real digits to measure what a model draws for each prompt.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from amnesia_sd.core.cache import cache_dir
from amnesia_sd.core.config import SEED_LIMIT
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.paths import Output, guard, publish, stamp
from amnesia_sd.model.diffusion import corrupt
from amnesia_sd.model.families import FAMILIES, family_of
from amnesia_sd.model.tokenizer import write_word_t5_tokenizer, write_word_tokenizer

VERSION = 1

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Every template is used with the digit's word and with its numeral. The bare "{}" is there
# because Selective Amnesia prompts the concept by its bare name.
TRAIN_TEMPLATES = (
    "{}",
    "a handwritten digit {}",
    "the number {}",
    "a picture of the digit {}",
    "handwritten {}",
    "an image of a {}",
    "the numeral {}",
    "a drawing of the number {}",
)
# Never used in training (nor meant for forgetting): they measure how a model generalises to
# phrasings of a digit that nobody trained it on, e.g. whether a forgotten digit comes back.
# Their words are in the vocabulary and the text encoder met them as random filler words
# (see _augmented_prompt), but never in these phrasings.
HELDOUT_TEMPLATES = (
    "{} written by hand",
    "a photo of a handwritten {}",
    "a black and white sketch of the figure {}",
    "digit: {}",
    "the symbol for {} on paper",
    "a small scanned {}",
)
# `amnesia-sd attack`'s training phrasings: neither forget's (TRAIN_TEMPLATES, which forget
# --adversarial's inner attack uses on this model) nor the held-out test phrasings. Their words are
# in the vocabulary.
ATTACK_TEMPLATES = (
    "a scribble of the numeral {}",
    "{} in pencil",
    "a neat drawing of {}",
    "a print of the figure {}",
    "an old scan showing {}",
    "a single {} on the page",
)

# Words the tokenizer keeps whole. The context words go beyond the templates so that prompts
# nobody planned for still tokenize into words rather than letters; anything else falls back to
# letter pieces.
CONTEXT_WORDS = (
    "a an the of by on in with and or for to at from is this that it its my your "
    "handwritten hand written writing drawn drawing draw sketch sketched scan scanned photo "
    "photograph picture image painting illustration rendering render print printed scribble "
    "digit digits number numbers numeral numerals figure symbol sign character glyph letter "
    "black white gray grey dark light bright blurry sharp clear small large big little tiny "
    "thin thick bold neat messy simple old new pixel pixels art style paper ink pencil pen "
    "chalk board page showing shows shown made single mnist dataset sample "
    "cat dog man woman person face car house tree flower sky noise random blank empty nothing"
).split()

IMAGE_SIZE = 16  # pixels; each 8x8 digit pixel becomes a 2x2 block
LATENT_CHANNELS = 4
MAX_PROMPT_TOKENS = 32
UNCONDITIONAL_PROMPT = ""
CFG_DROPOUT = 0.1  # share of training prompts replaced by "" so classifier-free guidance works

# Training budget, sized to build in about three minutes on two CPU cores.
TEXT_STEPS = 200
TEXT_BATCH = 128
VAE_STEPS = 150
VAE_BATCH = 64
VAE_KL_WEIGHT = 1e-4
DENOISER_STEPS = 400
DENOISER_BATCH = 64
DENOISER_LR = 2e-3
WARMUP_STEPS = 20
# The SD3-shaped digits model (`--model digits-sd3`): a flow-matching MMDiT trained around the
# digits model's own VAE and text encoder. Its text is 32 CLIP rows and 256 T5 rows (what
# StableDiffusion3Pipeline reads by default): each step costs more than the UNet's, so smaller batches.
SD3_DENOISER_STEPS = 1500
SD3_DENOISER_BATCH = 32
SD3_SHIFT = 1.0  # 16-pixel images need no shift towards noise (SD3's 3.0 is for 1024 pixels)
# One thread: the build's tensors are small, so a second thread gains little on an idle machine,
# and while another process kept a core busy two threads ran ten times slower. A fixed count
# also keeps the arithmetic, hence the weights, independent of the number of cores.
BUILD_THREADS = 1

# The tool's sampling defaults, which the quality bar is measured with.
RECOMMENDED_GUIDANCE = 7.5
RECOMMENDED_STEPS = 50
EVAL_SAMPLES_PER_DIGIT = 50
BUILD_EVAL_SAMPLES = 10  # per digit and prompt set: catches a broken build for ~20 s of sampling


def train_prompts(digit: int) -> list[str]:
    return _fill(TRAIN_TEMPLATES, digit)


def heldout_prompts(digit: int) -> list[str]:
    return _fill(HELDOUT_TEMPLATES, digit)


def _fill(templates: tuple[str, ...], digit: int) -> list[str]:
    return [t.format(name) for name in (DIGIT_WORDS[digit], str(digit)) for t in templates]


# --model names of the digits models: the UNet (SD 1.x-shaped) and the SD3-shaped flow-matching one.
SPECS = {"digits": "sd", "digits-sd3": "sd3"}


def default_model_path(family: str = "sd") -> Path:
    return cache_dir() / (f"digits-v{VERSION}" if family == "sd" else f"digits-{family}-v{VERSION}")


# The builds of seed 0, shipped so that nobody waits for them; `amnesia-sd digits build` reproduces them.
SHIPPED_MODEL = Path(__file__).parent.parent / "digits_model"
SHIPPED_MODELS = {"sd": SHIPPED_MODEL, "sd3": Path(__file__).parent.parent / "digits_sd3_model"}


def ensure_digits_model(progress: bool = True, family: str = "sd") -> Path:
    """The digits model of `family`: a build in the cache (`amnesia-sd digits build`) if there is
    one, else the shipped build; with neither, build it into the cache now."""
    path, shipped = default_model_path(family), SHIPPED_MODELS[family]
    if not (path / "digits.json").is_file() and (shipped / "digits.json").is_file():
        return shipped
    if not (path / "digits.json").is_file():
        try:
            build_digits_model(path, progress=progress, family=family)
        except FileExistsError:
            # Another process finished the same build first; its folder is just as good.
            if not (path / "digits.json").is_file():
                raise
    return path


# ---------------------------------------------------------------------------------------------
# Real digits and the evaluation classifier


def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as [N, 1, 8, 8] floats in [0, 1] (the raw 0..16 ink levels / 16) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def classifier_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, stratified 75/25 split of the real digits into train and held-out indices."""
    generator = torch.Generator().manual_seed(1234)
    train, heldout = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = len(members) // 4
        heldout.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(heldout).sort().values


class DigitClassifier(nn.Module):
    """A small CNN on 8x8 grayscale digits in [0, 1]; returns logits over the ten digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image by up to one pixel in each direction: generated digits are rarely centred
    exactly like the scanned ones, and the classifier must not care."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    return torch.stack([p[:, y : y + 8, x : x + 8] for p, (y, x) in zip(padded, offsets.tolist())])


def train_digit_classifier(seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the fixed training split of the real digits; return it and its held-out accuracy."""
    images, labels = load_real_digits()
    train, heldout = classifier_split(labels)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _epoch in range(30):
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(model(_shift(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[heldout]).argmax(1) == labels[heldout]).float().mean().item()
    return model, accuracy


def classifier_path() -> Path:
    return cache_dir() / f"digit-classifier-v{VERSION}.safetensors"


def load_digit_classifier() -> DigitClassifier:
    """The evaluation classifier, trained (a few seconds) and cached as safetensors on first use."""
    from safetensors.torch import load_file, save_file

    path = classifier_path()
    model = DigitClassifier()
    if path.is_file():
        model.load_state_dict(load_file(path))
    else:
        model, accuracy = train_digit_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed, so a half-written file is never loaded.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(model.state_dict(), tmp, metadata={"heldout_accuracy": f"{accuracy:.4f}"})
        os.replace(tmp, path)
    return model.eval()


def images_to_classifier_input(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of any size and mode -> [N, 1, 8, 8] in [0, 1], as the real digits are given.

    Box averaging undoes the model's 2x2 pixel blocks exactly, and 8-bit gray / 255 matches the
    real digits' ink / 16 up to rounding.
    """
    arrays = [
        np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays) / 255.0).unsqueeze(1)


def prediction_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of class probabilities (ln 10 = 2.30 at most)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def classify(images: list[Image.Image], classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Class probabilities [N, 10] for the given images."""
    if classifier is None:
        classifier = load_digit_classifier()
    with torch.no_grad():
        return classifier(images_to_classifier_input(images)).softmax(dim=1)


def evaluate_digits(
    pipe,
    prompts_for=train_prompts,
    samples_per_digit: int = EVAL_SAMPLES_PER_DIGIT,
    guidance_scale: float = RECOMMENDED_GUIDANCE,
    num_inference_steps: int = RECOMMENDED_STEPS,
    batch_size: int = 250,
    seed: int = 0,
    classifier: DigitClassifier | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Sample each digit from its prompts (cycled) and score the samples with the classifier.

    Per digit: `accuracy` (share classified as that digit), `probability` (mean probability of
    that digit) and `entropy` (mean entropy of the prediction, ln 10 = 2.30 at most): the
    measures Selective Amnesia reports for a forgotten class.
    """
    if classifier is None:
        classifier = load_digit_classifier()
    window = family_of(pipe).pipeline_kwargs()
    per_digit = [prompts_for(d) for d in range(10)]
    prompts = [per_digit[d][i % len(per_digit[d])] for d in range(10) for i in range(samples_per_digit)]
    probs = []
    bar = tqdm(total=len(prompts), desc="evaluating", unit="img", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        images = pipe(
            batch,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed * 100_003 + start),  # own noise per batch
            **window,
        ).images
        probs.append(classify(images, classifier))
        bar.update(len(batch))
    bar.close()
    probs = torch.cat(probs).view(10, samples_per_digit, 10)
    entropy = prediction_entropy(probs)
    return {
        d: {
            "accuracy": (probs[d].argmax(-1) == d).float().mean().item(),
            "probability": probs[d, :, d].mean().item(),
            "entropy": entropy[d].mean().item(),
        }
        for d in range(10)
    }


# ---------------------------------------------------------------------------------------------
# Building the model


def _models(vocab_size: int, bos: int, eos: int, pad: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Two VAE levels: 16x16 RGB <-> 8x8x4 latents, so the pixel/latent size factor is not 1 and
    # code that confuses the two fails here as it would on a real model.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )
    # Cross-attention only at 4x4 and in the middle: attention at 8x8 doubled the cost of every
    # step (training, Fisher, sampling) without being needed to tell ten classes apart.
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def _scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion v1's training schedule. clip_sample must be off: latents are not in [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def _lr_lambda(total: int):
    """Learning-rate factor: linear warm-up, then a cosine down to 10% at `total` steps."""

    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / (total - WARMUP_STEPS)))

    return factor


def _augmented_prompt(digit: int | None, rng: random.Random) -> str:
    """A training prompt for the text encoder: a train template naming `digit` (or no digit at
    all), with up to three filler words dropped in at random places.

    The fillers are context words or random letter strings (which tokenize into letter pieces),
    never digit names, so the encoder learns to find the digit in text it has not seen before
    instead of memorising sixteen exact phrasings.
    """
    words = []
    if digit is not None:
        words = rng.choice(TRAIN_TEMPLATES).format(rng.choice((DIGIT_WORDS[digit], str(digit)))).split()
    for _ in range(rng.randint(0, 3)):
        if rng.random() < 0.7:
            filler = rng.choice(CONTEXT_WORDS)
        else:
            filler = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))
        if not any(name in filler for name in DIGIT_WORDS):
            words.insert(rng.randint(0, len(words)), filler)
    return " ".join(words)


def _train_text_encoder(text_encoder, tokenizer, seed: int, progress: bool) -> None:
    """Pretrain the text encoder to tell which digit (if any) a prompt names, as CLIP's encoder
    is pretrained before Stable Diffusion; it stays frozen afterwards.

    Learned jointly with the UNet from scratch, the prompt barely influenced the denoiser within
    the build's budget (conditional and unconditional predictions differed by under 1%).
    """
    rng = random.Random(seed)
    head = nn.Linear(text_encoder.config.hidden_size, 11)  # ten digits and "no digit"
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *head.parameters()], lr=2e-3)
    for _step in tqdm(range(TEXT_STEPS), desc="text encoder", unit="step", disable=not progress):
        labels = [rng.randrange(11) for _ in range(TEXT_BATCH)]
        prompts = [_augmented_prompt(d if d < 10 else None, rng) for d in labels]
        ids = tokenizer(
            prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        loss = F.cross_entropy(head(text_encoder(ids).pooler_output), torch.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _train_vae(vae, pixels: torch.Tensor, generator: torch.Generator, progress: bool) -> None:
    """Reconstruction loss plus a light KL term (per latent element), which keeps the latents
    compact and smooth enough to diffuse without blurring the digits."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(VAE_STEPS))
    for _step in tqdm(range(VAE_STEPS), desc="VAE", unit="step", disable=not progress):
        batch = pixels[torch.randint(0, len(pixels), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        kl = posterior.kl().mean() / latents[0].numel()
        loss = F.mse_loss(vae.decode(latents).sample, batch) + VAE_KL_WEIGHT * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def _train_denoiser(family, denoiser, scheduler, latents, labels, embeddings, generator, progress,
                    steps: int = DENOISER_STEPS, batch: int = DENOISER_BATCH) -> None:
    """Standard latent-diffusion training with the family's own objective and timestep draw
    (diffusion.py: epsilon prediction for the UNet, flow matching for the SD3 transformer).

    `latents` holds each image's scaled posterior mean and std, from which a fresh sample is drawn
    every time, as Stable Diffusion does. `embeddings` holds the frozen text encoders' conditioning
    (families.py), each entry [11, prompts, ...]: each digit's train prompts, the last row "".
    """
    mean, std = latents
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=DENOISER_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps))
    prompts = next(iter(embeddings.values())).shape[1]
    for _step in tqdm(range(steps), desc="denoiser", unit="step", disable=not progress):
        index = torch.randint(0, len(mean), (batch,), generator=generator)
        clean = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = family.draw_timesteps(scheduler, batch, generator)
        prompt = torch.randint(0, prompts, (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < CFG_DROPOUT
        condition = {k: torch.where(dropped.view(-1, *[1] * (v.ndim - 2)), v[-1, 0], v[labels[index], prompt])
                     for k, v in embeddings.items()}
        noisy, model_timesteps, target, weights = corrupt(family, scheduler, clean, noise, timesteps)
        prediction = family.predict(denoiser, noisy, model_timesteps, condition)
        # (the UNet build's loss as it always was: its weights reproduce the shipped model bit for bit)
        loss = F.mse_loss(prediction, target) if weights is None else \
            (weights.view(-1, 1, 1, 1) * F.mse_loss(prediction, target, reduction="none")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def _train_pipeline(seed: int, progress: bool):
    """Train all parts from scratch; return the (unsaved) StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline


    torch.manual_seed(seed)  # weight initialisation
    generator = torch.Generator().manual_seed(seed)  # data order, noise, timesteps, prompt choice

    with tempfile.TemporaryDirectory() as words_dir:
        vocabulary = [*DIGIT_WORDS, *(str(d) for d in range(10)), *CONTEXT_WORDS]
        tokenizer = write_word_tokenizer(vocabulary, words_dir, MAX_PROMPT_TOKENS)
    vae, text_encoder, unet = _models(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    scheduler = _scheduler()

    _train_text_encoder(text_encoder, tokenizer, seed, progress)
    text_encoder.eval().requires_grad_(False)

    pixels, labels = _pixels()
    _train_vae(vae, pixels, generator, progress)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    # SD's scaling factor: it makes the latents that the UNet sees about unit variance.
    scaling = 1.0 / posterior.mean.std().item()
    vae.register_to_config(scaling_factor=scaling)

    prompts = _prompt_table()
    ids = tokenizer(
        [p for group in prompts for p in group], padding="max_length", max_length=MAX_PROMPT_TOKENS,
        truncation=True, return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeddings = text_encoder(ids)[0].view(len(prompts), len(prompts[0]), MAX_PROMPT_TOKENS, -1)
    latents = (posterior.mean * scaling, posterior.std * scaling)
    _train_denoiser(FAMILIES["sd"], unet, scheduler, latents, labels, {"encoder_hidden_states": embeddings},
                    generator, progress)

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits as 16x16 RGB images in [-1, 1] (gray, 2x2 blocks per pixel, three identical
    channels: an image like SD's), and their labels."""
    digits, labels = load_real_digits()
    pixels = F.interpolate(digits, scale_factor=IMAGE_SIZE // 8, mode="nearest") * 2 - 1
    return pixels.repeat(1, 3, 1, 1), labels


def _prompt_table() -> list[list[str]]:
    """Every train prompt, one row per digit and a last row of "" (repeated only to keep the table
    rectangular): the text encoders are frozen, so each is encoded once up front."""
    prompts = [train_prompts(d) for d in range(10)]
    return prompts + [[UNCONDITIONAL_PROMPT] * len(prompts[0])]


def _train_sd3_pipeline(seed: int, progress: bool):
    """The SD3-shaped digits model: the digits model's VAE (shift 0) and its CLIP text encoder as
    both of SD3's CLIP encoders (an identity projection: the pooled text is the encoder's own), a
    small T5 encoder left at its random initialisation and frozen (a fixed function of the prompt,
    so the pipeline is whole: diffusers loads SD3 without T5 only when told), and an
    SD3Transformer2DModel trained from scratch by flow matching with the SD3 family's own loss and
    logit-normal timesteps. Returns the unsaved pipeline."""
    import copy

    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)  # weight initialisation
    generator = torch.Generator().manual_seed(seed)
    base = StableDiffusionPipeline.from_pretrained(ensure_digits_model(progress), safety_checker=None,
                                                   requires_safety_checker=False)
    width = base.text_encoder.config.hidden_size
    config = copy.deepcopy(base.text_encoder.config)
    config.projection_dim = width
    encoders = []
    for _ in range(2):
        encoder = CLIPTextModelWithProjection(config)
        encoder.text_model.load_state_dict(base.text_encoder.state_dict())
        with torch.no_grad():
            encoder.text_projection.weight.copy_(torch.eye(width))
        encoders.append(encoder.eval().requires_grad_(False))
    with tempfile.TemporaryDirectory() as words_dir:
        tokenizer_3 = write_word_t5_tokenizer([*DIGIT_WORDS, *(str(d) for d in range(10)), *CONTEXT_WORDS], words_dir,
                                              MAX_PROMPT_TOKENS)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=2 * width, d_kv=16, d_ff=64, num_layers=1,
                                 num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = base.vae.eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts latents: by nothing here
    latent = IMAGE_SIZE // 2
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=3,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=2 * width, caption_projection_dim=64,
        pooled_projection_dim=2 * width, pos_embed_max_size=latent,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=base.tokenizer,
        text_encoder_2=encoders[1], tokenizer_2=base.tokenizer, text_encoder_3=t5.eval().requires_grad_(False),
        tokenizer_3=tokenizer_3,
    )
    family = FAMILIES["sd3"]
    prompts = _prompt_table()
    with torch.no_grad():
        flat = family.encode_text(pipe, [p for group in prompts for p in group])
        pixels, labels = _pixels()
        posterior = vae.encode(pixels).latent_dist
    embeddings = {k: v.view(len(prompts), len(prompts[0]), *v.shape[1:]) for k, v in flat.items()}
    scaling = vae.config.scaling_factor
    _train_denoiser(family, transformer, family.training_scheduler(scheduler.config),
                    (posterior.mean * scaling, posterior.std * scaling), labels, embeddings, generator, progress,
                    steps=SD3_DENOISER_STEPS, batch=SD3_DENOISER_BATCH)
    transformer.eval()
    return pipe


def build(output_dir: Path | None = None, seed: int = 0, overwrite: bool = False, family: str = "sd") -> Path:
    """`amnesia-sd digits build`: the digits model trained from `seed` into `output_dir` (default:
    the cache, where `--model digits` looks). An old build there is replaced only with `overwrite`,
    only if it is ours, and only once the new one is complete; the shipped model is never touched."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed must be in [0, 2**31), got {seed}")
    target = Path(output_dir) if output_dir else default_model_path(family)
    guard([Output("--output-dir", target, "digits.json", "digits model")],
          {f"the shipped digits model ({name})": path for name, path in SHIPPED_MODELS.items()}, overwrite)
    return build_digits_model(target, seed=seed, replace=True, family=family)


def build_digits_model(output_dir: Path, seed: int = 0, progress: bool = True, replace: bool = False,
                       family: str = "sd") -> Path:
    """Train the digits model from `seed`, measure it, and save it as a StableDiffusionPipeline
    folder with a digits.json record inside.

    The folder appears only when complete: everything is written to a temporary sibling that is
    renamed at the end. Raises FileExistsError if `output_dir` exists, unless `replace` (the caller
    has checked it may go): then what is there is swapped out only once the new build is complete.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not replace:
        raise FileExistsError(f"{output_dir} already exists; remove it to rebuild")
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(output_dir, seed, progress, replace, FAMILIES[family])
    finally:
        torch.set_num_threads(threads)


def _build(output_dir: Path, seed: int, progress: bool, replace: bool, family) -> Path:
    started = time.monotonic()
    pipeline = (_train_pipeline if family.name == "sd" else _train_sd3_pipeline)(seed, progress)
    train_seconds = time.monotonic() - started

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent)
    )
    try:
        pipeline.save_pretrained(partial, safe_serialization=True)
        # Measure the saved folder exactly as users will load and sample it.
        saved = family.pipeline_class().from_pretrained(partial)
        family.sample_with(saved)
        saved.set_progress_bar_config(disable=True)
        quality = {
            name: evaluate_digits(
                saved, prompts_for, samples_per_digit=BUILD_EVAL_SAMPLES, progress=progress
            )
            for name, prompts_for in [("train_prompts", train_prompts), ("heldout_prompts", heldout_prompts)]
        }
        record = {
            **stamp(),
            "version": VERSION,
            "seed": seed,
            **({"steps": {"text_encoder": TEXT_STEPS, "vae": VAE_STEPS, "unet": DENOISER_STEPS},
                "unet_batch_size": DENOISER_BATCH} if family.name == "sd" else
               {"architecture": family.name, "built_on": "the digits model's VAE and text encoder",
                "steps": {"transformer": SD3_DENOISER_STEPS}, "transformer_batch_size": SD3_DENOISER_BATCH,
                "scheduler_shift": SD3_SHIFT}),
            "image_size": IMAGE_SIZE,
            "parameters": {
                name: sum(p.numel() for p in getattr(pipeline, name).parameters())
                for name in (family.denoiser, "vae", "text_encoder")
            },
            "train_templates": list(TRAIN_TEMPLATES),
            "heldout_templates": list(HELDOUT_TEMPLATES),
            "evaluation": {
                "scheduler": family.sampler or type(pipeline.scheduler).__name__,
                "num_inference_steps": RECOMMENDED_STEPS,
                "guidance_scale": RECOMMENDED_GUIDANCE,
                "samples_per_digit": BUILD_EVAL_SAMPLES,
                **{
                    name: {
                        "min_accuracy": min(r["accuracy"] for r in result.values()),
                        "per_digit": {
                            str(d): {k: round(v, 4) for k, v in r.items()} for d, r in result.items()
                        },
                    }
                    for name, result in quality.items()
                },
            },
            "train_seconds": round(train_seconds, 1),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (partial / "digits.json").write_text(json.dumps(record, indent=2) + "\n")
        if replace:
            publish(partial, output_dir, "digits.json")
        else:
            try:
                partial.rename(output_dir)
            except OSError as error:  # created by someone else meanwhile
                raise FileExistsError(f"{output_dir} appeared while building") from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output_dir
