"""The data errors every script reports as one line: data a user can fix, named with the fix."""


class DataError(ValueError):
    """Bad or missing data the user can fix; the message names the file and the fix."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that does not exist (or holds nothing usable)."""
