"""Errors raised for requests the engine cannot serve."""


class RequestError(ValueError):
    """A bad generation request; the message is one line naming the problem."""
