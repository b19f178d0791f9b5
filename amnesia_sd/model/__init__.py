"""The model: model families (the one seam for SD 1/2, SDXL, ...), loading a model, what trains
(full or LoRA) and the EWC penalty that holds it, the denoising loss, the tokenizer, the memory plan,
and the built-in digits model. Imports core only."""
