from hydra.errors import CompactHydraException


class ConfigError(CompactHydraException, ValueError):
    """Bad user input. The message names the problem and the fix; Hydra prints it without a traceback."""
