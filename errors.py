"""The one exception for input a command cannot use.

Every command line (train.py, eval.py, export.py, sweep.py) reports a ``BadInput`` as one
line, ``error: <message>``, and exits with status 2, having written nothing it would have
to take back; any other exception is a bug and keeps its traceback. The message names
what is wrong and what to do instead.
"""


class BadInput(ValueError):
    """Input that cannot be used as given (a flag, a file, a directory, a checkpoint, data),
    or a run that cannot go on as asked: one line for the user, exit status 2."""
