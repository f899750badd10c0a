"""Exceptions raised by iotflow.

Client-library errors (paho-mqtt, confluent-kafka, httpx, duckdb) never
escape a connector as they are: each is translated at the boundary into one
of these, chained with ``raise ... from exc`` so the original stays visible.

    IotflowError
    ├── ConfigError              a setting or declaration is wrong (names the field and the fix)
    ├── BrokerError
    │   ├── BrokerUnavailable    a broker could not be reached or started
    │   │   └── NotAuthorized    a broker refused the login (user name, password, certificate)
    │   └── PublishRejected      a broker refused a message
    ├── AckTimeout               a device or broker did not acknowledge in time
    ├── TwinRejected             a twin update or command does not fit the registry (also a ValueError)
    ├── InvalidTransition        a lifecycle (command, plan, saga, rollout) was asked for a transition it does not allow
    └── StackError               the local broker stack could not be started or found
"""

from __future__ import annotations

__all__ = [
    "AckTimeout",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "InvalidTransition",
    "IotflowError",
    "NotAuthorized",
    "PublishRejected",
    "StackError",
    "TwinRejected",
]


class IotflowError(Exception):
    """Base class of every error iotflow raises on purpose."""


class ConfigError(IotflowError, ValueError):
    """A setting or a declaration is invalid; the message names the field and the fix."""


class BrokerError(IotflowError):
    """A broker did not do what was asked."""


class BrokerUnavailable(BrokerError):
    """A broker could not be reached (refused, timed out, wrong address)."""


class NotAuthorized(BrokerUnavailable):
    """A broker refused the login: bad user name or password, no or unknown client
    certificate, not authorized. The message names the broker (password redacted)
    and the setting to fix, never the secret."""


class PublishRejected(BrokerError):
    """A broker refused a message (size, authorization, quota)."""


class AckTimeout(IotflowError):
    """An acknowledgment did not arrive before its deadline."""


class StackError(IotflowError):
    """The local broker stack could not be started, found or stopped."""


class TwinRejected(IotflowError, ValueError):
    """An update, desired change or command does not fit a device's twin model.

    ``reason`` says what was wrong (the value and the rule), ``device_id`` and
    ``field`` say where when known, and ``kind`` is a short category to count
    rejections by (``unknown_device``, ``unknown_property``, ``wrong_type``,
    ``out_of_range``, ``not_writable``, ``unknown_command``, ``version_conflict``,
    ``future_timestamp``, ...).
    """

    def __init__(
        self,
        reason: str,
        *,
        device_id: str | None = None,
        field: str | None = None,
        kind: str = "invalid",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device_id = device_id
        self.field = field
        self.kind = kind


class InvalidTransition(IotflowError):
    """A lifecycle enum was asked to move where it may not: a bug, never bad input.

    ``subject`` names what moved (a command id, a plan id), ``have`` the current
    state, ``want`` the refused one, ``allowed`` the states reachable from ``have``.
    """

    def __init__(self, subject: str, have: str, want: str, allowed: frozenset[str] | set[str]) -> None:
        shown = ", ".join(sorted(allowed)) or "none (terminal)"
        super().__init__(f"{subject}: cannot go from {have} to {want}; allowed from {have}: {shown}")
        self.subject = subject
        self.have = have
        self.want = want
        self.allowed = frozenset(allowed)
