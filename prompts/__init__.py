"""Bundled prompt lists, installed as the package amnesia_sd.prompt_lists."""
