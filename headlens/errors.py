"""User-facing errors: one line, no traceback (the CLI prints them and exits non-zero)."""


class HeadlensError(Exception):
    """A mistake in what the user asked for (bad model, bad detector, bad path, prompt too long...)."""
