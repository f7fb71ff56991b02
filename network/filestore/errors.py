"""The file store's error answers: `{"error": "..."}` with an HTTP status."""

from __future__ import annotations

from rest_framework import exceptions


class ApiError(exceptions.APIException):
    """An error answered to the client as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status
