"""The exceptions fedspec raises for bad input.

Every one carries a single line that names what is wrong and how to fix it; the CLI prints that line
and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class FedspecError(Exception):
    """Base class: a problem the user can fix (config, data, budget), not a bug."""


class ConfigError(FedspecError, ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataError(FedspecError, ValueError):
    """Input data is missing or malformed; the message names the path or field."""


class AdapterError(FedspecError, ValueError):
    """An adapter cannot be placed as asked (unknown method, rank too large, no target matched)."""
