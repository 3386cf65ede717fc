"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2."""


class TuneError(Exception):
    """Base class: the message must name the file/field at fault and the fix."""


class ConfigError(TuneError):
    """A config key, value or override is wrong."""


class DataError(TuneError):
    """An input file (corpus, task JSON, tokenizer, model dir) is missing or malformed."""
