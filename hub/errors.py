"""Domain errors the services raise; the app maps each to its HTTP status."""

from __future__ import annotations


class HubError(Exception):
    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(HubError):
    status = 404


class Conflict(HubError):
    status = 409


class Invalid(HubError):
    status = 422


class Forbidden(HubError):
    status = 403
