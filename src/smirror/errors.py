"""Every exception smirror raises, shared by the compiled kernels and their
pure-Python references. Each one carries what went wrong and where, so the CLI
can print it without a traceback."""
from typing import Any

# process exit codes, one set for every verb (an error's ``exit_code`` picks one)
EXIT_OK = 0
EXIT_PARTIAL = 1      # ran, but some files could not be handled (reported)
EXIT_USAGE = 2        # bad arguments or configuration
EXIT_FAILED = 3       # could not run at all (missing source, disk full, ...)
EXIT_INTERRUPTED = 130


class SmirrorError(Exception):
    """Base class of every smirror error."""


class FrameError(SmirrorError, ValueError):
    """A journal frame (or queue record) is malformed: bad magic, version,
    length, checksum or op. ``offset`` is the byte offset in the buffer where
    the problem was found (None when it is not about one place)."""

    def __init__(self, message, offset=None):
        self.offset = offset
        if offset is not None:
            message = f"{message} (at byte offset {offset})"
        super().__init__(message)


class DeltaError(SmirrorError, ValueError):
    """A delta or signature does not fit the data it is applied to."""


class QueueError(SmirrorError):
    """Base class of queue failures."""


class QueueFull(QueueError):
    """The queue reached its disk limit or the free-space minimum of its
    volume; the engine turns this into an auto-disconnect."""


class QueueClosed(QueueError):
    """The queue was closed while a caller waited on it or used it."""


class QueueCorrupt(QueueError, ValueError):
    """A spill segment holds a damaged record that is not a torn tail."""


class ConfigError(SmirrorError, ValueError):
    """A configuration value or command-line argument is invalid."""
    exit_code = EXIT_USAGE


class MirrorError(SmirrorError):
    """A mirror could not run (bad source/target, overlapping trees, ...).
    ``exit_code``: could not run, unless set to the usage code when the
    arguments are at fault."""

    exit_code: int = EXIT_FAILED
    summary: Any = None     # a mirror's Summary, when it stopped part way


class AuthError(SmirrorError, PermissionError):
    """A login failed (unknown user or wrong password), or a user's role does
    not allow the request. Never carries the password."""


class ConfinementError(SmirrorError, ValueError):
    """A path would reach outside its root: absolute, ``..``, an empty or
    NUL-containing name, or a symlink on the way. ``path`` names it."""

    def __init__(self, message, path=None):
        self.path = path
        super().__init__(message)


class DtclError(SmirrorError, ValueError):
    """A DTCL script is wrong (syntax, an undefined variable, an unknown verb,
    a bad argument): found before anything runs. ``script``, ``line`` and
    ``column`` (1-based) say where; ``source_line`` is that line of the script
    (passwords already masked), shown with a caret under the column."""
    exit_code = 2       # the CLI's usage error

    def __init__(self, message, *, script="<script>", line=0, column=0, source_line=None,
                 hint=None):
        self.message = message
        self.script = script
        self.line = line
        self.column = column
        self.source_line = source_line
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        # no line: about the script as a whole (it cannot be read, say)
        where = f"{self.script}:{self.line}:{self.column}" if self.line else self.script
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        if self.source_line is not None:
            text += f"\n    {self.source_line.expandtabs(1)}\n    {' ' * max(self.column - 1, 0)}^"
        return text


class DtclRunError(SmirrorError):
    """A statement of a checked DTCL script failed while running (daemon
    unreachable, login refused, no such connection): the message names the
    statement's line and what already ran; the script stopped there."""
    exit_code = 3       # the CLI's "could not run"


class SourceChanged(SmirrorError):
    """A source file changed while the mirror copied it; the mirror retries
    the file (it never leaves a half-old, half-new copy as done)."""


class WatchError(SmirrorError, OSError):
    """A watcher (inotify or fanotify) could not start or keep watching;
    ``errno`` says why, the message says where."""


class FanotifyUnavailable(WatchError):
    """fanotify cannot watch this root here; the message says why."""


class EventFormatError(SmirrorError, ValueError):
    """A fanotify event record does not fit the buffer it was read into."""

    def __init__(self, message, offset):
        self.offset = offset
        super().__init__(f"fanotify event: {message} (at byte offset {offset})")


class ProtocolError(SmirrorError, ConnectionError):
    """The peer sent something that is not the smirror protocol, or broke it."""


class LinkClosed(ProtocolError):
    """The peer closed the link (possibly in the middle of a message)."""


class LoginRefused(AuthError):
    """A login the server refused with an ERROR already sent to the peer."""


class RequestError(SmirrorError):
    """The daemon refused or failed a request; the message is the daemon's."""


class ApplyError(SmirrorError):
    """An op could not be applied; names the op."""


class TaskError(SmirrorError, ValueError):
    """A task is malformed, or a daemon refused to run one of its commands."""


class MountError(SmirrorError):
    """The capture mount cannot be made or served: names the mount point
    and the reason."""


class BenchError(SmirrorError):
    """An smbench run could not be set up or did not finish."""


class BenchUsageError(BenchError):
    """A request smbench cannot run as asked (bad input: exit 2)."""
