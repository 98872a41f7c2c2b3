"""The exception raised for bad data-set input: a ValueError whose message names the problem and the fix."""


class DataError(ValueError):
    """Bad data-set input (a file, a folder, a split or an episode setting); the message says what and how to fix it."""
