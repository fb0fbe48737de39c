"""Client mistakes as OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

The `openai` client reads `error.message` into the exception it raises, so a client sees what it did wrong instead of
a bare "Internal Server Error". Only `RequestError` is turned into a 4xx; anything else that escapes a handler is our
fault: a 500 with a generic message, and the traceback goes to the server log.
"""

from typing import Any


class RequestError(Exception):
    """A request the server refuses, with the HTTP status (4xx) and the field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def request_error_body(error: RequestError) -> dict[str, Any]:
    return error_body(error.message, "invalid_request_error", error.param, error.code)


SERVER_FAULT_MESSAGE = "The server failed on this request (its fault, not yours); the traceback is in the server log."


def server_error_body() -> dict[str, Any]:
    return error_body(SERVER_FAULT_MESSAGE, "server_error", code="internal_error")
