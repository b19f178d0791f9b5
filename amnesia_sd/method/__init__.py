"""The method's pieces that several commands share: the Fisher, textual inversion (the attack and
forget --adversarial), the adversary, where a forget's sets and Fisher come from, checkpoints, and a
result's record (amnesia.json written and read). Imports core, model and data."""
