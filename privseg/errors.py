"""One error hierarchy for privseg.

Every error has a stable ``code`` (what a client matches on; it becomes the problem ``type``) and an
HTTP ``status``. Messages say what was wrong, where, and what to do; they never carry raw
identifiers, key material or field values from customer data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (not imported at run time: the CLI's start-up must not pay for pydantic)
    from pydantic import ValidationError


class PrivsegError(Exception):
    """Base class: anything privseg refuses or cannot do, said in words a user can act on."""

    code = "privseg-error"
    status = 500
    title = "privseg error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PrivsegError):
    """The input (a file, a row, a field, a request) is not acceptable."""

    code = "invalid-input"
    status = 422
    title = "Invalid input"


class PayloadTooLarge(InvalidInput):
    """An upload or body over the configured limit."""

    code = "body-too-large"
    status = 413
    title = "Body too large"


class PolicyError(PrivsegError):
    """A policy file is missing, malformed, or inconsistent."""

    code = "invalid-policy"
    status = 422
    title = "Invalid policy"


class KeysetError(PrivsegError):
    """The keyset is missing, unsafe (permissions, symlink) or malformed."""

    code = "keyset-error"
    status = 500
    title = "Keyset error"


class InvalidPseudonym(PrivsegError):
    """A token is not a pseudonym of this deployment (tampered, wrong prefix, unknown key version)."""

    code = "invalid-pseudonym"
    status = 422
    title = "Invalid pseudonym"


class NotFound(PrivsegError):
    code = "not-found"
    status = 404
    title = "Not found"


class Conflict(PrivsegError):
    """The request conflicts with the stored state (e.g. an unfinished key rotation)."""

    code = "conflict"
    status = 409
    title = "Conflict"


class StoreError(PrivsegError):
    """The store is inconsistent (a manifest entry without its file, and the like)."""

    code = "store-error"
    status = 500
    title = "Store error"


class EngineUnavailable(PrivsegError):
    """The computation engine asked for cannot run here (the spark engine without pyspark or Java)."""

    code = "engine-unavailable"
    status = 503
    title = "Engine unavailable"


class PolicyViolation(PrivsegError):
    """The request asks for something the category policy forbids (a dimension, too many of them)."""

    code = "policy-violation"
    status = 422
    title = "Refused by policy"


class Unauthenticated(PrivsegError):
    """No valid API key was presented."""

    code = "unauthenticated"
    status = 401
    title = "Authentication required"


class NotPermitted(PrivsegError):
    """The recipient may not receive this kind of release for this category."""

    code = "not-permitted"
    status = 403
    title = "Not permitted"


class BudgetExhausted(PrivsegError):
    """The release would exceed a privacy budget; the message states what remains."""

    code = "budget-exhausted"
    status = 429
    title = "Privacy budget exhausted"


class AuditTampered(PrivsegError):
    """The audit log's hash chain does not verify."""

    code = "audit-tampered"
    status = 500
    title = "Audit log failed verification"


def describe_validation_error(exc: ValidationError) -> str:
    """``loc: message; ...`` for a pydantic error, never quoting the input (it may be key material)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
    )


def loggable(exc: BaseException) -> str:
    """What a log may say of ``exc``: a privseg error's type and message (written, like every message
    here, never to carry data; the same text an API client is shown), of anything else only its type
    (a library's message may quote a value it choked on)."""
    if isinstance(exc, PrivsegError):
        return f"{type(exc).__name__}: {exc.message}"
    return type(exc).__name__
