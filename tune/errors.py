"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2."""


class TuneError(Exception):
    """Base class: the message must name the file/field at fault and the fix."""


class ConfigError(TuneError):
    """A config key, value or override is wrong."""


class DataError(TuneError):
    """An input file (corpus, task JSON, tokenizer, model dir) is missing or malformed."""


class ConfigProblems(ConfigError):
    """Several problems of one config, reported together: a summary line, then one line per problem."""

    def __init__(self, problems: list[str], source: str = "the config"):
        self.problems, self.source = list(problems), source
        super().__init__(f"{len(self.problems)} problems in {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Problems:
    """Collects a config's problems so a recipe's `validate` reports them all at once instead of the first.

        problems = Problems()
        if cfg.x < 1:
            problems.add(f"x must be >= 1, got {cfg.x}")
        model = problems.call(check_model_dir, cfg.model, "model")   # None if it raised
        problems.raise_if_any()   # the one error as it was, or ConfigProblems listing all
    """

    def __init__(self):
        self.errors: list[TuneError] = []

    def add(self, message: str) -> None:
        self.errors.append(ConfigError(message))

    def extend(self, messages) -> None:
        """add() each of `messages` (e.g. the lines a check_* helper returns)."""
        for message in messages:
            self.add(message)

    def call(self, check, *args, **kwargs):
        """check(*args, **kwargs), or None with its TuneError recorded."""
        try:
            return check(*args, **kwargs)
        except TuneError as e:
            self.errors.append(e)
            return None

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigProblems([str(e) for e in self.errors])
