"""The one error type of bad user input, below every other module (it imports nothing)."""


class ConfigError(ValueError):
    """Bad user input: the CLI prints the message on one line and exits with status 2."""
