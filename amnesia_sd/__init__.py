"""amnesia-sd: make a Stable Diffusion model forget a concept with Selective Amnesia."""

__version__ = "0.1.0"
