"""Errors raised for requests the engine cannot serve."""


class RequestError(ValueError):
    """A bad generation request; the message is one line naming the problem."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
