"""What running a module can fail with; NumPy-free, so the agent can catch them without loading a runner."""

from __future__ import annotations


class InputError(ValueError):
    """Inputs that do not match the module's signature; the text names what was expected."""


class BodyError(InputError):
    """A request body that is not JSON at all (HTTP 400, where other input errors are 422)."""


class NotAcceptable(InputError):
    """The answer cannot be given in the form the request asked for (HTTP 406): a ``.npy`` of several outputs."""


class ModelError(RuntimeError):
    """The model could not be loaded or run; the text is the runtime's own reason."""


def failure(exc: BaseException) -> tuple[str, str]:
    """How a worker reports a request's failure: its kind (``body``, ``accept``, ``input``, ``model``) and text."""
    if isinstance(exc, BodyError):
        return "body", str(exc)
    if isinstance(exc, NotAcceptable):
        return "accept", str(exc)
    if isinstance(exc, InputError):
        return "input", str(exc)
    if isinstance(exc, MemoryError):
        return "model", "out of memory (module memory limit)"
    return "model", str(exc) or repr(exc)


def from_kind(kind: str, text: str) -> Exception:
    """The exception a reported failure stands for (the inverse of :func:`failure`)."""
    kinds: dict[str, type[Exception]] = {"body": BodyError, "accept": NotAcceptable, "input": InputError}
    return kinds.get(kind, ModelError)(text)
