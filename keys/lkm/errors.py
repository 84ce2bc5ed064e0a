"""The Local Key Manager's fixed error set: one name per failure, each with its HTTP status.

The service answers every failure as `{"error": {"code": NAME, "message": ...}, "request_id": ...}`
with the status below; the client turns each name back into the exception class of the same name.
Nothing else is ever sent, so callers can rely on the set (scripts match on `code`).

| code                 | HTTP | meaning                                                                |
|----------------------|------|------------------------------------------------------------------------|
| bad_request          | 400  | malformed JSON, a missing or ill-typed member, bad base64               |
| unsupported          | 400  | a well-formed request for something refused on purpose (PKCS#1 v1.5)    |
| unauthenticated      | 401  | no, bad, stale or replayed credentials; an unregistered certificate    |
| forbidden            | 403  | authenticated, but the client lacks the role the operation needs        |
| not_found            | 404  | no such endpoint                                                        |
| unknown_key          | 404  | no usable key with that kid / keypairId (absent, or retired)            |
| method_not_allowed   | 405  | the endpoint exists, not with this method                               |
| request_timeout      | 408  | the request body did not arrive in time                                |
| conflict             | 409  | a key state change the key rules forbid                                 |
| too_large            | 413  | the body, or a batch, is larger than the configured bound               |
| unwrap_failed        | 422  | the wrap does not decrypt under the key (bad padding and wrong key look the same) |
| rate_limited         | 429  | this client (or address) is over its request rate; see Retry-After      |
| internal             | 500  | a bug; the request id finds it in the service log                       |
| unavailable          | 503  | the keyring or the audit log is not usable: nothing is answered unaudited |
| overloaded           | 503  | too much work queued, or the request ran past its time; see Retry-After |
"""

from __future__ import annotations

from mediaseal.codec import AuthenticationError
from mediaseal.keys.errors import KeysError

STATUS: dict[str, int] = {
    "bad_request": 400,
    "unsupported": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_key": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "conflict": 409,
    "too_large": 413,
    "unwrap_failed": 422,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
    "overloaded": 503,
}
RETRYABLE_CODES = frozenset({"rate_limited", "overloaded", "unavailable"})


class LKMError(KeysError):
    """Base class of every Local Key Manager failure (service side and client side)."""

    code = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        self.headers: dict[str, str] = {}  # extra response headers (WWW-Authenticate for a stale Hawk ts)

    @property
    def status(self) -> int:
        """The HTTP status the service answers this with (500 for the client-side-only names)."""
        return STATUS.get(self.code, 500)


class BadRequestError(LKMError):
    code = "bad_request"


class UnsupportedError(LKMError):
    code = "unsupported"


class UnauthenticatedError(LKMError):
    code = "unauthenticated"


class ForbiddenError(LKMError):
    code = "forbidden"


class NotFoundError(LKMError):
    code = "not_found"


class LKMUnknownKeyError(LKMError):
    """The service holds no usable key with that kid (named apart from keys.UnknownKeyError, a keyring lookup)."""

    code = "unknown_key"


class MethodNotAllowedError(LKMError):
    code = "method_not_allowed"


class RequestTimeoutError(LKMError):
    code = "request_timeout"


class ConflictError(LKMError):
    code = "conflict"


class TooLargeError(LKMError):
    code = "too_large"


class UnwrapFailedError(LKMError, AuthenticationError):
    """The wrap does not decrypt. Also a codec AuthenticationError, which is what a wrong key is to the codec."""

    code = "unwrap_failed"


class RateLimitedError(LKMError):
    code = "rate_limited"


class InternalError(LKMError):
    code = "internal"


class UnavailableError(LKMError):
    code = "unavailable"


class OverloadedError(LKMError):
    code = "overloaded"


class KeyServiceUnreachableError(LKMError):
    """Client side: no answer from the service at all (refused, DNS, TLS handshake, timeouts after retries)."""

    code = "unreachable"  # never sent by the service; not in STATUS


class ProtocolError(LKMError):
    """Client side: the service answered something that is not this protocol (wrong service, proxy page)."""

    code = "protocol"


class LKMConfigError(LKMError):
    """A service or client setting is unusable (clients file, TLS files, listen address, credentials file)."""

    code = "config"


ERROR_CLASSES: dict[str, type[LKMError]] = {
    cls.code: cls
    for cls in (
        BadRequestError, UnsupportedError, UnauthenticatedError, ForbiddenError, NotFoundError, LKMUnknownKeyError,
        MethodNotAllowedError, RequestTimeoutError, ConflictError, TooLargeError, UnwrapFailedError,
        RateLimitedError, InternalError, UnavailableError, OverloadedError,
    )
}
assert set(ERROR_CLASSES) == set(STATUS)  # the table and the classes are one set
