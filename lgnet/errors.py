"""Errors a user can cause: a bad scenario, kernel image, option or file.

Rule 7 of the house: these are LgnetError, printed as one clear message with exit status 2.
A guest's misbehaviour is not an error here (it is a killed guest with its reason), and a bug
in lgnet stays a traceback.
"""

USER_ERROR_EXIT = 2


class LgnetError(Exception):
    """A mistake in what the user gave us; str() is the whole message."""
