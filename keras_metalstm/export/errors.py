"""The error type of the export package."""


class ExportError(ValueError):
    """A bad input to adapt/export/predict (wrong class count, shape, dtype, existing target...): the message
    names the problem and the fix."""
