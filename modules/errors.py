"""What running a module can fail with; NumPy-free, so the agent can catch them without loading a runner."""

from __future__ import annotations


class InputError(ValueError):
    """Inputs that do not match the module's signature; the text names what was expected."""


class BodyError(InputError):
    """A request body that is not JSON at all (HTTP 400, where other input errors are 422)."""


class ModelError(RuntimeError):
    """The model could not be loaded or run; the text is the runtime's own reason."""
