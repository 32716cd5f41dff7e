"""The one exception type for bad input.

A `UserError` is something the user can fix (a path, a name, a weight); run.py
prints its message alone, without a traceback, and exits non-zero. Anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the offending thing and how to fix it."""
