"""The one exception type users see: the CLI prints its message as one line and exits 2."""


class RetroError(Exception):
    """A problem with the user's input, config or files, stated in one line."""
