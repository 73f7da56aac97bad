from hydra.errors import CompactHydraException


class ConfigError(CompactHydraException, ValueError):
    """Bad user input. The message names the problem and the fix; Hydra prints it without a traceback."""


class OutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message names the settings that lower the need."""


class SweepFailed(CompactHydraException):
    """Some jobs of a sweep failed; the message is the sweep's summary (their records say why)."""


class EngineFailed(RuntimeError):
    """The evaluation engine's process did not start or did not finish; the message names its log."""


class EngineCheckFailed(RuntimeError):
    """The adapter gate refused an engine's output (it disagrees with HF+peft, or the adapter changes
    nothing); no score of the run was kept."""
