"""The exception raised for bad data-set input (a ValueError whose message names the problem and the fix), and the
readable part of TensorFlow's errors for such messages."""


class DataError(ValueError):
    """Bad data-set input (a file, a folder, a split or an episode setting); the message says what and how to fix it."""


def tensorflow_error_text(error: BaseException) -> str:
    """The first line of the human part of a TensorFlow error's message, without its "{{function_node ...}}"
    prefix and "[Op:...]" suffix."""
    text = getattr(error, "message", None) or str(error)
    text = text.split("}}")[-1].split("[Op:")[0].strip()
    return text.splitlines()[0] if text else type(error).__name__
