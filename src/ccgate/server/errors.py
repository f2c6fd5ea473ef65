"""Errors the server core raises; each knows the HTTP status and error type it maps to."""

from __future__ import annotations

from ccgate.errors import CcgateError, ConfigError


class RefusedError(CcgateError):
    """A request the server refuses; the message is shown to the caller as it is."""

    status: int = 400
    err_type: str = "invalid_request_error"


class InvalidRequestError(RefusedError):
    status = 422


class AuthenticationError(RefusedError):
    status = 401
    err_type = "authentication_error"


class PermissionDeniedError(RefusedError):
    status = 403
    err_type = "permission_error"


class NotFoundError(RefusedError):
    status = 404
    err_type = "not_found_error"


class ConflictError(RefusedError):
    status = 409


class ServerStateError(ConfigError):
    """The server's files are missing, unsafe, or already there when they should not be."""


class BadRequestError(RefusedError):
    """The request itself is malformed (not JSON, a required header missing)."""

    status = 400
