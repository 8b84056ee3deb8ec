"""Why an install stops: the bundle's fault (:class:`InstallError`), or the environment's (:class:`RetryLater`)."""

from __future__ import annotations


class InstallError(RuntimeError):
    """An install step refused the bundle; the text is the reason reported to the hub."""


class RetryLater(InstallError):
    """The environment, not the bundle, stopped the install: it fails with the reason and is tried again later."""


class SlowDownload(RetryLater):
    """Fewer bytes arrived over the window than the minimum rate allows (Uptane's slow-retrieval attack)."""


class DiskFull(RetryLater):
    """Not enough free space for the install, or a write met a full disk."""
