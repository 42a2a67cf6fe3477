"""The one exception type for mistakes a user can fix: the CLI prints its message on one line and exits 2."""


class ZoliteError(Exception):
    """A problem with the user's input or environment, with the fix in its message."""
