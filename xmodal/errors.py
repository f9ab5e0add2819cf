"""One exception type for bad user input: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a manifest). The message names it and the fix."""
