"""Images and prompts: sampling (one seed per image), image sets, prompt lists, the detectors that
judge images, grids and reports. Imports core and model."""
