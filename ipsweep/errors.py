"""Errors a user can fix: each message names the problem and the fix."""


class ConfigError(ValueError):
    """Bad input (config, data, model path), detected before any training starts."""
