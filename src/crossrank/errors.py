"""Error types whose message is written for the person who runs crossrank."""


class CrossrankError(Exception):
    """Report an expected failure (bad input, missing file, rejected config).

    The command line prints the message alone, without a traceback, and exits with
    status 2. The message states what was expected, what arrived and how to fix it.
    """


class DataError(CrossrankError):
    """Report input data that cannot be read or does not follow the contract."""


class ConfigError(CrossrankError):
    """Report a parameter file or option that is missing or invalid."""
