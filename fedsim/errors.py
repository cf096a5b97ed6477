"""The errors fedsim turns into one clear line (and an exit code) at the CLI."""


class FedsimError(Exception):
    """Bad input or an impossible setting: the CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2


class ConfigError(FedsimError):
    """A config key has a wrong type, an out-of-range value, or is unknown."""


class InputFileError(FedsimError):
    """An input file exists but cannot be read (a directory, no permission): an OS error, so
    the CLI exits 1 rather than 2, still with one line."""

    exit_code = 1


class ClientFailure(Exception):
    """A client raised during a round, or a node was lost. The message names the node,
    partition and round; ``client_traceback`` holds the client's own traceback (exit 1)."""

    def __init__(self, message: str, client_traceback: str | None = None) -> None:
        super().__init__(message)
        self.client_traceback = client_traceback


class Diverged(FedsimError):
    """The global model's loss or metric became NaN or infinite: the run stops at that round
    as ``diverged`` (exit 1), keeping the rounds before it. The message names the round, the
    value and the settings that most often cause it."""

    exit_code = 1
