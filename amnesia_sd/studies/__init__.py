"""Studies that run several commands on the built-in digits model: the demo and its attack study.
Above the commands, which they call; below the CLI."""
