"""The one exception type for mistakes a user can fix: the CLI prints its message on one line and exits 2."""


class ZoliteError(Exception):
    """A problem with the user's input or environment, with the fix in its message."""


def check_at_least(option: str, value, low) -> None:
    """A number the user gave (None: not given) must be at least `low`; `option` is its CLI name, e.g. --limit."""
    if value is not None and not value >= low:   # (nan fails too)
        raise ZoliteError(f"{option} must be at least {low}, got {value}")
