"""Retries of transient failures: exponential backoff with full jitter, bounded by attempts
and by the current deadline (`pglayer.deadline`).

Only what is safe to replay is retried: a read, or a whole transaction whose COMMIT was not
sent. `CommitIndeterminateError` is never retried, nor is a shed or timed-out acquire (the
caller has already waited, or should not wait at all).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_none,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from pglayer import _deadline as deadline
from pglayer._errors import (
    CommitIndeterminateError,
    ConnectionLostError,
    DatabaseUnavailableError,
    DeadlockError,
    SerializationError,
    StatementsLostError,
    TooManyConnectionsError,
)
from pglayer._logs import Throttle, left_out

__all__ = [
    "REASONS",
    "RetryHooks",
    "RetryPolicy",
    "is_retryable",
    "reason_for",
    "retry_after",
    "retrying",
    "set_testing",
]

log = logging.getLogger("pglayer.retry")
T = TypeVar("T")

_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (DeadlockError, "deadlock"),
    (SerializationError, "serialization_failure"),
    (ConnectionLostError, "connection_lost"),
    (StatementsLostError, "statements_lost"),
    (TooManyConnectionsError, "too_many_connections"),
    (DatabaseUnavailableError, "unavailable"),
)
REASONS = tuple(reason for _, reason in _REASONS)  # every label `reason_for` gives
_testing = False


def set_testing(enabled: bool) -> None:
    """Skip the waits between attempts (attempt counts stay as configured)."""
    global _testing
    _testing = enabled


def reason_for(exc: BaseException) -> str | None:
    """A stable label for a retryable error, or None if it must not be retried."""
    if isinstance(exc, CommitIndeterminateError) or getattr(exc, "lasting", False):
        return None
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return None


def is_retryable(exc: BaseException) -> bool:
    return reason_for(exc) is not None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry; waits grow from `initial` up to `maximum`."""

    attempts: int = 3
    initial: float = 0.05
    maximum: float = 1.0


class RetryHooks(Protocol):
    """Instrumentation: told of every retry and every give-up, with the reason."""

    def retried(self, reason: str) -> None: ...
    def gave_up(self, reason: str) -> None: ...


async def retrying(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, hooks: RetryHooks, what: str
) -> T:
    """Call `fn` until it succeeds, fails for good, or runs out of attempts or deadline."""
    try:
        return await fn()
    except Exception as exc:
        first = exc
    return await retry_after(first, fn, policy, hooks, what)


_RETRIES_SAID = Throttle()


def _said(what: str, reason: str, attempt: int, attempts: int) -> None:
    """A retry, logged: at most one line a second for each kind (see `Throttle`)."""
    count = _RETRIES_SAID.allow((what, reason))
    if count is not None:
        log.info(
            "%s: retrying after %s (attempt %d of %d)%s",
            what,
            reason,
            attempt,
            attempts,
            left_out(count),
        )


async def retry_after(
    first: Exception,
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    hooks: RetryHooks,
    what: str,
) -> T:
    """`fn`'s first attempt failed with `first`: retry it if that is safe and time allows.

    Entered only from the caller's `except` path, so the common case costs nothing.
    """
    reason = reason_for(first)
    if reason is None:
        raise first
    first_wait = 0.0 if _testing else random.uniform(0, policy.initial)
    left = deadline.remaining()
    if policy.attempts <= 1 or (left is not None and left <= first_wait):
        hooks.gave_up(reason)
        raise first
    hooks.retried(reason)
    _said(what, reason, 2, policy.attempts)
    await asyncio.sleep(first_wait)

    stop: stop_base = stop_after_attempt(policy.attempts - 1)
    left = deadline.remaining()
    if left is not None:
        stop = stop | stop_before_delay(max(left, 0.0))

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = reason_for(exc) if exc else None
        if reason:
            hooks.retried(reason)
            _said(what, reason, state.attempt_number + 2, policy.attempts)

    retryer = AsyncRetrying(
        stop=stop,
        # Full jitter; the window starts where the first wait left off.
        wait=wait_none()
        if _testing
        else wait_random_exponential(multiplier=policy.initial * 2, max=policy.maximum),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # A coroutine function, so that tenacity awaits what `fn` returns.
        return await fn()

    try:
        return await retryer(attempt)
    except Exception as exc:
        reason = reason_for(exc)
        if reason:
            hooks.gave_up(reason)
        raise
