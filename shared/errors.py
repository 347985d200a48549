"""The error every input check raises, in a module of its own.

`model` (settings) and `filters` (the filter syntax) both validate user input; with the error here,
neither has to import the other to raise it, and `model` can use `filters` without a late import.
"""

from __future__ import annotations


class ValidationError(ValueError):
    """Bad input from a user or a settings row. `field` names the offending setting."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
