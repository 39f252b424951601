"""Exceptions raised by ganeti-kvm.

The names follow the cluster manager's ``ganeti.errors`` module so that a
node daemon catching ``errors.HypervisorError`` keeps working after the
import is switched.  Every exception derives from :class:`GenericError`.
"""

from __future__ import annotations


class GenericError(Exception):
    """Root of every exception this library raises."""


class ProgrammerError(GenericError):
    """The library was called in a way that can never work (a bug in the caller)."""


class ConfigurationError(GenericError):
    """A configuration value is inconsistent or missing."""


class HypervisorError(GenericError):
    """A hypervisor operation failed; the message says what and how to fix it."""


class ParameterError(HypervisorError):
    """A hypervisor parameter has a bad value.

    Subclasses :class:`HypervisorError` so that callers written against the
    cluster manager (which only knows ``HypervisorError``) still catch it.
    """

    def __init__(self, message: str, name: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.name = name
        self.value = value


class QemuLaunchError(HypervisorError):
    """QEMU refused to start; carries the command line, exit code and stderr."""

    def __init__(self, message: str, argv: list[str] | None = None,
                 exitcode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.argv = list(argv or [])
        self.exitcode = exitcode
        self.stderr = stderr


class MonitorError(HypervisorError):
    """Talking to an instance's QMP monitor failed (connection, timeout or QMP error)."""


class MonitorTimeout(MonitorError):
    """The QMP monitor did not answer within the allowed time."""


class QmpCommandError(MonitorError):
    """QEMU answered a QMP command with an error.

    ``error_class`` and ``desc`` are QEMU's own words.
    """

    def __init__(self, message: str, error_class: str = "", desc: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc


class InstanceNotRunning(HypervisorError):
    """The operation needs a running instance and there is none by that name."""


class InstanceBusy(HypervisorError):
    """Another operation holds the instance's lock."""


class RuntimeStateError(HypervisorError):
    """An instance's saved runtime record is missing, truncated or corrupt."""


class MigrationError(HypervisorError):
    """A migration failed or was cancelled; the source instance keeps running."""


class GuestAgentError(HypervisorError):
    """The QEMU guest agent in an instance did not answer, or refused a command."""


class HotplugError(HypervisorError):
    """A device cannot be added to, removed from or changed on a running instance."""
