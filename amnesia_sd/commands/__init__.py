"""One module per command (replay and surrogate sets, fim, forget, sample, eval, attack, export).
Commands never import each other: what two of them share lives in a layer below."""
