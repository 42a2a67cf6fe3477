"""The one exception type for mistakes a user can fix: the CLI prints its message on one line and exits 2."""
import math


class ZoliteError(Exception):
    """A problem with the user's input or environment, with the fix in its message."""


def check_at_least(option: str, value, low) -> None:
    """A number the user gave (None: not given) must be finite and at least `low`; `option` is its CLI name, e.g.
    --limit."""
    if value is not None and not (value >= low and math.isfinite(value)):   # (nan fails both)
        raise ZoliteError(f"{option} must be at least {low}, got {value}")
