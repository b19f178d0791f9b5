"""The bottom layer: what every other part uses. The settings of every command (typed configs,
validated when built), errors, atomic files, the path guard and publishing, the cache's place and
ownership, cost lines. Imports nothing of amnesia_sd above it."""
