"""The one exception type for bad user input; the CLI prints it as a one-line error, exit 2."""


class InputError(ValueError):
    """Bad user input: a file, field or value that is not what was expected.

    The message is one line and names the file or field and what was expected; the CLI prints
    it without a traceback. Raising it must never discard finished work.
    """
