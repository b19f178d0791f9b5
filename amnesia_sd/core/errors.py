"""The one exception type that reaches users as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or a state the user must fix; the message says what is wrong and how to fix it."""


class Interrupted(Exception):
    """Ctrl-C, with what a rerun of the same command will do."""
