"""forget --adversarial: forgetting that resists the attack (AdvUnlearn's idea inside Selective
Amnesia's objective).

Every `adversarial_every` steps, `attack`'s inner loop learns a token embedding that brings the
concept back on the model being trained: textual inversion on images of the concept that the model
drew before forgetting (OUT/data/concept), starting from where the previous round left the token.
Prompts naming that token then stand in for the concept's prompts in a share of the surrogate
samples, so the mapping to the surrogate covers what the attack found. EWC and replay are unchanged.

The token lives in the adversary's own copy of the tokenizer and text encoder (float32): the
result's text encoder and tokenizer are the base model's, byte for byte.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from .attack import add_token, initializer_id, learn_token
from .config import ForgetConfig
from .errors import UserError
from .families import Conditioning
from .generate import image_seed
from .imageset import ImageSet
from .prompts import bundled, read_prompts

TOKEN = "<amnesia-adversary>"


def adversarial_prompts(config: ForgetConfig) -> list[str]:
    """The prompts that name the learned token: the templates (a file of '{}' lines) with the token."""
    templates = read_prompts(config.adversarial_templates or bundled("concept_templates.txt"))
    wrong = [t for t in templates if t.count("{}") != 1]
    if wrong:
        raise UserError(f"--adversarial-templates: every line needs exactly one {{}} where the token goes, "
                        f"not {wrong[0]!r}")
    return [t.format(TOKEN) for t in templates]


def check_adversarial(config: ForgetConfig, family, pipe) -> None:
    """Before any work: a model family with one text encoder, usable templates, a one-token initializer."""
    if family.name != "sd":
        raise UserError(f"--adversarial supports Stable Diffusion 1.x/2.x only for now, not {family.title} "
                        "(its inner attack learns one token for one text encoder)")
    adversarial_prompts(config)
    initializer_id(pipe.tokenizer, config.adversarial_initializer, "--adversarial-initializer")


class Adversary:
    """The token that recovers the concept on the model being trained, and its prompts'
    conditioning. Registered for checkpointing: a resumed run goes on from the same token."""

    def __init__(self, family, pipe, config: ForgetConfig, concept_set: ImageSet, device):
        self.family, self.config, self.images = family, config, concept_set
        self.text = SimpleNamespace(tokenizer=copy.deepcopy(pipe.tokenizer),
                                    text_encoder=copy.deepcopy(pipe.text_encoder).to(device, torch.float32))
        self.token_id = add_token(self.text, TOKEN, config.adversarial_initializer, "--adversarial-initializer")
        self.prompts = adversarial_prompts(config)
        self.rounds: list[list[float]] = []  # [step, first loss, last loss] of every round so far
        self.conditioning: Conditioning = self.family.encode_text(self.text, self.prompts)

    @property
    def row(self) -> torch.Tensor:
        return self.text.text_encoder.get_input_embeddings().weight[self.token_id]

    def learn(self, unet, scheduler, step: int, accelerator) -> None:
        """One round of the inner attack on `unet` as it is now (its weights and .grad untouched);
        every process ends with process 0's token."""
        from accelerate.utils import broadcast

        c = self.config
        row, losses, _ = learn_token(self.family, self.text, unet, scheduler, self.token_id, self.images,
                                     self.prompts, c.adversarial_steps, c.adversarial_learning_rate,
                                     c.adversarial_batch_size, image_seed(c.seed, step, "adversary"))
        self.set_row(broadcast(row.contiguous()))
        self.rounds.append([float(step), losses[0], losses[-1]])

    def set_row(self, row: torch.Tensor) -> None:
        with torch.no_grad():
            self.row.copy_(row)
        self.conditioning = self.family.encode_text(self.text, self.prompts)

    def stand_in(self, concept: Conditioning, index: torch.Tensor) -> Conditioning:
        """`concept` (one sample per row) with the samples whose `index` is >= 0 conditioned on that
        adversarial prompt instead."""
        chosen = index >= 0
        if not chosen.any():
            return concept
        out = {}
        for key, value in concept.items():
            swapped = self.conditioning[key][index.clamp_min(0)].to(value.device, value.dtype)
            out[key] = torch.where(chosen.view(-1, *[1] * (value.ndim - 1)), swapped, value)
        return out

    def record(self) -> dict:
        """What amnesia.json keeps of the adversary."""
        return {"token": TOKEN, "prompts": self.prompts,
                "rounds": [{"step": int(s), "loss_first": a, "loss_last": b} for s, a, b in self.rounds]}

    # accelerate's register_for_checkpointing
    def state_dict(self) -> dict:
        return {"row": self.row.detach().cpu().clone(), "rounds": torch.tensor(self.rounds, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"].tolist()
        self.set_row(state["row"].to(self.row.device))
