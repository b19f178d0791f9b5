"""forget --adversarial: forgetting that resists the attack (AdvUnlearn's idea inside Selective
Amnesia's objective).

Every `adversarial_every` steps, `attack`'s inner loop learns a token embedding that brings the
concept back on the model being trained: textual inversion on images of the concept that the model
drew before forgetting (OUT/data/concept), starting from where the previous round left the token.
Prompts naming that token then stand in for the concept's prompts in a share of the surrogate
samples, so the mapping to the surrogate covers what the attack found. EWC and replay are unchanged.

The token lives in the adversary's own float32 copies of the tokenizers and text encoders (SDXL: a
row in each): the result's text encoders and tokenizers are the base model's.
"""

from __future__ import annotations

import torch

from amnesia_sd.core.config import ForgetConfig
from amnesia_sd.data.generate import image_seed
from amnesia_sd.data.imageset import ImageSet
from amnesia_sd.data.prompts import bundled, read_templates
from amnesia_sd.method.textual_inversion import (add_token, choose_initializer, embedding_file, learn_token, set_token,
                                                 text_copies, token_rows)
from amnesia_sd.model.families import Conditioning

TOKEN = "<amnesia-adversary>"


def adversarial_prompts(config: ForgetConfig) -> list[str]:
    """The prompts that name the learned token: the templates (a file of '{}' lines) with the token."""
    templates = read_templates(config.adversarial_templates or bundled("concept_templates.txt"),
                               "--adversarial-templates", "the token")
    return [t.format(TOKEN) for t in templates]


DEFAULT_INITIALIZERS = ("object", "digit")  # neutral words; the digits model's vocabulary has only the second


def check_adversarial(config: ForgetConfig, family, pipe) -> str:
    """Before any work: usable templates, an initializer of one token in every tokenizer. Returns the
    initializer: the one given, else the first default that this model's tokenizers hold as one token."""
    adversarial_prompts(config)
    return choose_initializer(pipe, family, config.adversarial_initializer, DEFAULT_INITIALIZERS,
                              "--adversarial-initializer")


class Adversary:
    """The token that recovers the concept on the model being trained, and its prompts'
    conditioning. Registered for checkpointing: a resumed run goes on from the same token."""

    def __init__(self, family, pipe, config: ForgetConfig, concept_set: ImageSet, device):
        self.family, self.config, self.images = family, config, concept_set
        self.text = text_copies(pipe, family)
        for _, encoder in family.text_parts():
            getattr(self.text, encoder).to(device, torch.float32)
        self.token_ids = add_token(self.text, family, TOKEN, config.adversarial_initializer,
                                   "--adversarial-initializer")
        self.prompts = adversarial_prompts(config)
        self.rounds: list[list[float]] = []  # [step, first loss, last loss] of every round so far
        self.conditioning: Conditioning = self.family.encode_text(self.text, self.prompts)

    @property
    def rows(self) -> list[torch.Tensor]:
        return token_rows(self.text, self.family, self.token_ids)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * 4 for _, encoder in self.family.text_parts()
                   for p in getattr(self.text, encoder).parameters())

    def learn(self, unet, scheduler, step: int, accelerator) -> None:
        """One round of the inner attack on `unet` as it is now (its weights and .grad untouched);
        every process ends with process 0's token."""
        from accelerate.utils import broadcast

        c = self.config
        rows, losses, _ = learn_token(self.family, self.text, unet, scheduler, self.token_ids, self.images,
                                      self.prompts, c.adversarial_steps, c.adversarial_learning_rate,
                                      c.adversarial_batch_size, image_seed(c.seed, step, "adversary"),
                                      fp16=accelerator.mixed_precision == "fp16")
        self.set_rows([broadcast(row.contiguous()) for row in rows])
        self.rounds.append([float(step), losses[0], losses[-1]])

    def set_rows(self, rows: list[torch.Tensor]) -> None:
        set_token(self.text, self.family, self.token_ids, rows)
        self.conditioning = self.family.encode_text(self.text, self.prompts)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The token in diffusers' textual-inversion layout."""
        return embedding_file(self.family, TOKEN, self.rows)

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

    # what forget's checkpoints carry (checkpoints.save_checkpoint)
    def state_dict(self) -> dict:
        return {"rows": [row.detach().cpu().clone() for row in self.rows],
                "rounds": torch.tensor(self.rounds, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"].tolist()
        self.set_rows([row.to(mine.device) for row, mine in zip(state["rows"], self.rows)])
