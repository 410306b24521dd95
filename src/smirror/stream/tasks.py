"""Task commands inline in the stream (``smirror queue-task``).

A task is a TASK op in a connection's journal. Its payload (:class:`TaskSpec`,
UTF-8 JSON) says which commands run where:

* ``on_queue``    on the source, when the task is queued (before it is inserted);
* ``on_transmit`` on the source, just before the frame holding it is sent;
* ``on_receive``  on the target, when it arrives (made durable, not applied);
* ``on_execute``  on the target, when the applier reaches it: every earlier op
  is applied and no later one is until the command ends or its timeout
  passes (``timeout`` 0 = do not wait, None = forever).

A task queued for a target goes into every connection to that target at the
same point of the source's history; the target runs its ``on_execute`` once,
when every connection of the group has reached it (a barrier), so a backup
of two replication sets sees both at the same source moment.

Safety (:class:`TaskPolicy`): a daemon runs task commands only when
``tasks.enabled`` is set, and only executables inside ``tasks.directory``
(no ``..``, no absolute path or symlink leading elsewhere). Commands run
without a shell: a command is split into words like a shell would (quotes),
the first word names the executable, and with an allow-listed environment
(a fixed PATH, the locale, TZ, HOME of the daemon's user and the task's own
SMIRROR_* variables: nothing else of the daemon's). Everything else is
refused with an error that names the task, the stage and why.

A TASK payload comes from the source: :meth:`TaskSpec.decode` type- and
range-checks every field, so any problem with it is a :class:`TaskError`
(the target refuses the task with a NOTICE and goes on), never another
exception in the applier.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import pwd
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from smirror.errors import TaskError

if TYPE_CHECKING:
    from smirror.ops import Op

log = logging.getLogger("smirror.stream.tasks")

STAGES = ("on_queue", "on_transmit", "on_receive", "on_execute")
OUTPUT_LIMIT = 64 * 1024          # bytes of a command's output kept (the tail)
SPEC_VERSION = 1

# bounds of a task spec's fields (a TASK payload is at most 64 KiB anyway)
MAX_NAME = 200                    # characters of a task name
MAX_WORDS = 256                   # words of a command, arguments of a task
MAX_WORD = 4096                   # characters of one word or argument
MAX_TEXT = 256                    # characters of the id and the source
MAX_GROUP = 4096                  # connections in a task's group
MAX_TIMEOUT = 30 * 86400.0        # seconds an on-execute may be waited for


def parse_timeout(value) -> float | None:
    """``forever`` / None -> None (wait as long as it takes), else seconds >= 0."""
    if value is None or value == "forever":
        return None
    from smirror.units import parse_duration
    return parse_duration(value, "task timeout")


def _short(value) -> str:
    """repr of a value for a message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_text(value, what: str, limit: int, empty: bool = True) -> None:
    """A string that can go into an argv, an environment and a log line:
    at most ``limit`` characters, no NUL, encodable as a file name."""
    if not isinstance(value, str):
        raise TaskError(f"{what} must be a string, got {_short(value)}")
    if len(value) > limit or (not empty and not value.strip()) or "\0" in value:
        raise TaskError(f"{what} must be {'1' if not empty else '0'}-{limit} characters "
                        f"without NUL, got {_short(value)}")
    try:
        os.fsencode(value)
    except UnicodeError:
        raise TaskError(f"{what} cannot be encoded: {_short(value)}") from None


def _check_name(name, what: str) -> None:
    _check_text(name, what, MAX_NAME, empty=False)


def _check_words(words: list, what: str) -> None:
    if len(words) > MAX_WORDS:
        raise TaskError(f"{what}: {len(words)} words, at most {MAX_WORDS}")
    for i, w in enumerate(words):
        _check_text(w, f"{what} word {i}", MAX_WORD)


def split_command(text, stage: str) -> list[str]:
    """A command as words (shell quoting, no shell): ``'backup.sh --full'``."""
    if isinstance(text, list) and text and all(isinstance(w, str) for w in text):
        return list(text)
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{stage.replace('_', '-')}: expected a command, got {text!r}")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise TaskError(f"{stage.replace('_', '-')} command {text!r}: {exc}") from None
    if not words:
        raise TaskError(f"{stage.replace('_', '-')}: empty command")
    return words


@dataclass
class TaskSpec:
    """What a TASK op carries."""
    name: str
    on_execute: list[str]
    on_receive: list[str] | None = None
    on_queue: list[str] | None = None
    on_transmit: list[str] | None = None
    timeout: float | None = None          # on-execute wait; None = forever
    args: list[str] = field(default_factory=list)
    id: str = ""                          # one id for every connection of the group
    group: list[int] = field(default_factory=list)   # conids the task went into
    source: str = ""
    queued_at: float = 0.0

    @classmethod
    def build(cls, name, *, on_execute, on_receive=None, on_queue=None, on_transmit=None,
              timeout=None, args=(), source: str = "") -> TaskSpec:
        _check_name(name, "task name")
        if on_execute is None:
            raise TaskError(f"task {name!r}: --on-execute is required")
        if not isinstance(args, (list, tuple)):
            raise TaskError(f"task {name!r}: arguments must be a list of strings, "
                            f"got {type(args).__name__}")
        spec = cls(name=name, on_execute=split_command(on_execute, "on_execute"),
                   on_receive=split_command(on_receive, "on_receive") if on_receive else None,
                   on_queue=split_command(on_queue, "on_queue") if on_queue else None,
                   on_transmit=split_command(on_transmit, "on_transmit") if on_transmit else None,
                   timeout=parse_timeout(timeout), args=list(args),
                   id=os.urandom(8).hex(), source=source, queued_at=time.time())
        spec.check(f"task {name!r}")
        return spec

    def check(self, where: str) -> None:
        """Type- and range-check every field (TaskError naming the field):
        a spec that passes can be run, logged and put in an environment
        without any other exception."""
        _check_name(self.name, f"{where}: name")
        for stage in STAGES:
            words = getattr(self, stage)
            if words is None and stage != "on_execute":
                continue
            if not isinstance(words, list) or not words:
                raise TaskError(f"{where}: {stage} must be a non-empty list of words, "
                                f"got {_short(words)}")
            _check_words(words, f"{where}: {stage}")
        if not isinstance(self.args, list):
            raise TaskError(f"{where}: args must be a list of strings, got {_short(self.args)}")
        _check_words(self.args, f"{where}: args")
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                              or not 0 <= t <= MAX_TIMEOUT):       # NaN fails too
            raise TaskError(f"{where}: bad timeout {_short(t)} (seconds 0..{MAX_TIMEOUT:.0f}, "
                            f"or forever)")
        _check_text(self.id, f"{where}: id", MAX_TEXT)
        _check_text(self.source, f"{where}: source", MAX_TEXT)
        if (not isinstance(self.group, list) or len(self.group) > MAX_GROUP
                or not all(type(c) is int and 0 <= c < 1 << 63 for c in self.group)):
            raise TaskError(f"{where}: group must be a list of at most {MAX_GROUP} connection "
                            f"ids, got {_short(self.group)}")
        q = self.queued_at
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q):
            raise TaskError(f"{where}: bad queued_at {_short(q)}")

    def encode(self) -> bytes:
        return json.dumps(dict(asdict(self), v=SPEC_VERSION), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload, where: str = "task") -> TaskSpec:
        """The spec a TASK op's payload holds; every problem with it, of any
        kind, is a TaskError naming ``where`` and the field."""
        try:
            obj = json.loads(bytes(payload))
        except (ValueError, RecursionError) as exc:     # (UnicodeDecodeError is a ValueError)
            raise TaskError(f"{where}: payload is not task JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != SPEC_VERSION:
            raise TaskError(f"{where}: unknown task format "
                            f"{_short(obj.get('v') if isinstance(obj, dict) else obj)}")
        obj.pop("v")
        if obj.get("timeout") == "forever":
            obj["timeout"] = None
        try:
            spec = cls(**obj)
        except TypeError as exc:
            raise TaskError(f"{where}: {exc}") from None
        if not spec.on_execute:
            raise TaskError(f"{where}: no on_execute command")
        spec.check(where)
        return spec

    def argv(self, stage: str) -> list[str] | None:
        words = getattr(self, stage)
        return None if words is None else words + self.args


class TaskPolicy:
    """Which commands this daemon may run: none unless ``enabled``, and only
    executables inside ``directory``."""

    def __init__(self, enabled: bool, directory: str):
        self.enabled = enabled
        self.directory = os.path.realpath(directory) if directory else ""

    @classmethod
    def from_config(cls, cfg) -> TaskPolicy:
        return cls(cfg.tasks.enabled, cfg.tasks.directory)

    def resolve(self, spec: TaskSpec, stage: str) -> list[str]:
        """The argv to run, its first word an absolute path inside the task
        directory; raises TaskError saying why a command is refused."""
        what = f"task {spec.name!r}: {stage.replace('_', '-')} command"
        argv = spec.argv(stage)
        if argv is None:
            raise TaskError(f"{what}: the task has none")
        if not self.enabled:
            raise TaskError(f"{what} refused: task processing is disabled on this daemon "
                            f"(set tasks.enabled = true and tasks.directory)")
        if not self.directory or not os.path.isdir(self.directory):
            raise TaskError(f"{what} refused: tasks.directory {self.directory or '(unset)'!r} "
                            f"is not a directory")
        exe = argv[0]
        if "\0" in exe or not exe:
            raise TaskError(f"{what} refused: bad executable name {exe!r}")
        path = os.path.realpath(os.path.join(self.directory, exe))
        if os.path.commonpath([path, self.directory]) != self.directory or path == self.directory:
            raise TaskError(f"{what} {exe!r} refused: outside the task directory {self.directory}")
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise TaskError(f"{what} {exe!r} refused: {path} is not an executable file")
        return [path, *argv[1:]]

    def check(self, spec: TaskSpec, stages) -> None:
        for stage in stages:
            if getattr(spec, stage) is not None:
                self.resolve(spec, stage)


@dataclass
class TaskResult:
    """One command run (or refused), as status and the log show it."""
    task: str
    id: str
    stage: str
    state: str = "running"         # running, ok, failed, refused, timeout, error
    exit: int | None = None
    seconds: float = 0.0
    output: str = ""
    error: str = ""
    conids: list[int] = field(default_factory=list)
    seq: int = 0
    started: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["output"] = d["output"][-4096:]
        return d


class TaskLog:
    """The recent task results of a daemon (status shows them)."""

    def __init__(self, keep: int = 50):
        self._items: collections.deque[TaskResult] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, result: TaskResult) -> TaskResult:
        with self._lock:
            self._items.append(result)
        return result

    def recent(self) -> list[dict]:
        with self._lock:
            return [r.as_dict() for r in self._items]


def run_command(argv: list[str], *, env: dict, cwd: str, timeout: float | None,
                result: TaskResult, on_done=None) -> TaskResult:
    """Run ``argv`` (no shell), output captured (its last OUTPUT_LIMIT
    bytes). Waits up to ``timeout`` (None = until it ends; 0 = not at all);
    a command still running then is left running, ``result.state`` is
    ``timeout`` and a thread records its end (``on_done(result)``)."""
    result.started = time.time()
    t0 = time.monotonic()
    out = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as exc:
        out.close()
        result.state, result.error = "error", f"cannot start {argv[0]}: {exc.strerror or exc}"
        result.seconds = time.monotonic() - t0
        _logged(result)
        return result

    def finish(code: int) -> None:
        result.exit = code
        result.seconds = time.monotonic() - t0
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - OUTPUT_LIMIT))
        result.output = out.read().decode(errors="replace")
        out.close()
        result.state = "ok" if code == 0 else "failed"
        if code != 0:
            result.error = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
        _logged(result)
        if on_done is not None:
            on_done(result)

    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        result.state = "timeout"
        result.seconds = time.monotonic() - t0
        log.warning("task %r %s: still running after %.1fs; going on without it",
                    result.task, result.stage, timeout)
        threading.Thread(target=lambda: finish(proc.wait()), daemon=True,
                         name=f"task-{result.task}").start()
        return result
    finish(code)
    return result


def _logged(r: TaskResult) -> None:
    level = logging.INFO if r.state == "ok" else logging.ERROR
    log.log(level, "task %r %s (connections %s, seq %s): %s%s in %.2fs%s", r.task, r.stage,
            r.conids, r.seq, r.state, f" ({r.error})" if r.error else "", r.seconds,
            ("; output:\n" + r.output.rstrip()) if r.output.strip() else "")


# what a task command sees of the daemon's environment: nothing but these
# (no credentials, no SMIRROR_* settings of the daemon, no LD_PRELOAD)
TASK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_KEEP = ("LANG", "LANGUAGE", "TZ")


def _home() -> str:
    """The home directory of the user the daemon runs as."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


def task_env(spec: TaskSpec, stage: str, **extra) -> dict:
    """The environment of a task command: an allow-list (a fixed PATH, the
    locale and time zone, HOME of the daemon's user), plus what the task
    needs to know about itself (SMIRROR_*)."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_")}
    env.update(PATH=TASK_PATH, HOME=_home())
    env.update({"SMIRROR_TASK_NAME": spec.name, "SMIRROR_TASK_ID": spec.id,
                "SMIRROR_TASK_STAGE": stage.replace("_", "-"), "SMIRROR_SOURCE": spec.source,
                "SMIRROR_TASK_QUEUED_AT": f"{spec.queued_at:.6f}"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


# queueing a task handles the changes the watcher has seen first; with
# writers that never pause, this long at most (then the task goes in)
TASK_SYNC_MAX = 5.0


class TaskCapture(Protocol):
    """A watcher (capture.watch.TreeCapture): held while a task is inserted,
    after it handled what the kernel reported so far."""
    root: bytes

    def paused(self) -> AbstractContextManager[Any]: ...
    def sync(self, quiet: float = ..., max_time: float | None = ...) -> None: ...


class TaskJournal(Protocol):
    """A connection journal (stream.journal.ConnectionJournal)."""
    def append_alone(self, op: Op, timeout: float = ...) -> int: ...


class TaskSender(Protocol):
    """A sender (stream.sender.Sender): runs a hook just before sending seq."""
    before_send: dict[int, Callable[[], object]]


@dataclass
class QueuedInto:
    """One connection a task goes into: its id, the watcher feeding it
    (None for library capture), its journal and its sender."""
    conid: int
    capture: TaskCapture | None
    journal: TaskJournal
    sender: TaskSender


class SourceTasks:
    """The source side of tasks: on-queue, the insertion into every
    connection of the group at one point of the source's history, and
    on-transmit just before each connection sends it."""

    def __init__(self, policy: TaskPolicy, log_: TaskLog | None = None):
        self.policy = policy
        self.log = log_ or TaskLog()

    def queue(self, spec: TaskSpec, target: str, into: list[QueuedInto]) -> dict:
        """Run on-queue (a failure: nothing queued, TaskError), then, with
        every watcher of those connections held, handle what the kernel has
        reported so far and append the task alone in a frame to each journal.
        Returns ``{"task", "id", "connections": {conid: seq}, "on_queue"}``."""
        self.policy.check(spec, ("on_queue", "on_transmit"))
        spec.group = [q.conid for q in into]
        reply: dict = {"task": spec.name, "id": spec.id, "connections": {}}
        if spec.on_queue is not None:
            r = self.run_hook(spec, "on_queue", spec.group, target)
            reply["on_queue"] = r.as_dict()
            if r.state != "ok":
                raise TaskError(f"task {spec.name!r} not queued: its on-queue command "
                                f"{r.state}: {r.error or r.output[-500:]}")
        captures: list[TaskCapture] = []
        for q in into:
            if q.capture is not None and all(q.capture is not c for c in captures):
                captures.append(q.capture)
        captures.sort(key=lambda c: c.root)        # one order everywhere: no deadlock
        payload = spec.encode()
        from smirror.ops import Op
        with contextlib.ExitStack() as held:
            for cap in captures:
                held.enter_context(cap.paused())
                cap.sync(max_time=TASK_SYNC_MAX)     # the task marks this moment
            for q in into:
                seq = q.journal.append_alone(Op.task(0, spec.name, payload))
                reply["connections"][str(q.conid)] = seq
                if spec.on_transmit is not None:
                    q.sender.before_send[seq] = functools.partial(
                        self.run_hook, spec, "on_transmit", [q.conid], target)
        log.info("task %r (%s) queued for %s on connection(s) %s", spec.name, spec.id, target,
                 reply["connections"])
        return reply

    def run_hook(self, spec: TaskSpec, stage: str, conids, target: str) -> TaskResult:
        result = self.log.add(TaskResult(spec.name, spec.id, stage, conids=list(conids)))
        try:
            argv = self.policy.resolve(spec, stage)
        except TaskError as exc:
            result.state, result.error = "refused", str(exc)
            _logged(result)
            return result
        env = task_env(spec, stage, SMIRROR_CONIDS=",".join(map(str, conids)), SMIRROR_TARGET=target)
        return run_command(argv, env=env, cwd=self.policy.directory, timeout=spec.timeout,
                           result=result)


class _Group:
    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.arrived: dict[int, int] = {}     # conid -> seq
        self.first_arrival = time.monotonic()
        self.started = False
        self.done = threading.Event()


class TargetTasks:
    """The target daemon's task runner, shared by its connections.

    ``arrived`` (receiver thread) runs on-receive once per task; ``execute``
    (applier thread) waits at the barrier until every connection of the
    task's group reached it (at most ``group_wait`` seconds), runs
    on-execute once, and returns when it ended or its timeout passed."""

    def __init__(self, policy: TaskPolicy, *, group_wait: float = 600.0, log_: TaskLog | None = None):
        self.policy = policy
        self.group_wait = group_wait
        self.log = log_ or TaskLog()
        self._groups: dict[tuple[str, str], _Group] = {}
        self._received: set[tuple[str, str]] = set()
        self._cond = threading.Condition()

    def waiting(self) -> list[dict]:
        """Tasks whose group has not fully arrived yet (status)."""
        with self._cond:
            return [{"task": g.spec.name, "id": g.spec.id, "arrived": sorted(g.arrived),
                     "waiting_for": sorted(set(g.spec.group) - set(g.arrived)),
                     "seconds": round(time.monotonic() - g.first_arrival, 1)}
                    for g in self._groups.values() if not g.started]

    def arrived(self, spec: TaskSpec, conid: int, seq: int, map_base: str) -> TaskResult | None:
        """A task reached this target (durable, not yet applied): check it
        (a refusal is returned, to be reported to the source) and run its
        on-receive command, once per task, in the background."""
        key = (spec.source, spec.id)
        try:
            self.policy.check(spec, ("on_receive", "on_execute"))
        except TaskError as exc:
            return self.log.add(TaskResult(spec.name, spec.id, "on_receive", "refused",
                                           error=str(exc), conids=[conid], seq=seq))
        with self._cond:
            if key in self._received:
                return None
            if len(self._received) > 10_000:       # ids of long-done tasks
                self._received.clear()
            self._received.add(key)
        if spec.on_receive is None:
            return None
        result = self.log.add(TaskResult(spec.name, spec.id, "on_receive", conids=[conid], seq=seq))
        argv = self.policy.resolve(spec, "on_receive")
        env = task_env(spec, "on_receive", SMIRROR_CONID=conid, SMIRROR_MAP_BASE=map_base,
                       SMIRROR_SEQ=seq)
        threading.Thread(target=run_command, args=(argv,), daemon=True, name=f"task-recv-{spec.name}",
                         kwargs=dict(env=env, cwd=map_base, timeout=None, result=result)).start()
        return result

    def execute(self, spec: TaskSpec, conid: int, seq: int, map_base: str,
                stop: threading.Event | None = None) -> TaskResult | None:
        """The applier of ``conid`` reached the task. Returns the result of
        on-execute for the connection that ran it (None for the others and
        when ``stop`` was set while waiting for the group)."""
        stop = stop or threading.Event()
        key = (spec.source, spec.id)
        group = set(spec.group) or {conid}
        with self._cond:
            g = self._groups.get(key)
            if g is None:
                g = self._groups[key] = _Group(spec)
            g.arrived[conid] = seq
            self._cond.notify_all()
            deadline = g.first_arrival + self.group_wait
            while not g.started and not group <= set(g.arrived):
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    break
                self._cond.wait(min(left, 0.5))
            if stop.is_set() and not g.started:
                del g.arrived[conid]        # it comes again after the restart
                return None
            leader = not g.started
            g.started = True
        if not leader:
            # another connection of the group runs it; this one goes on
            # when it is done (the same moment for all of them)
            while not g.done.wait(0.5):
                if stop.is_set():
                    return None
            return None
        try:
            missing = sorted(group - set(g.arrived))
            if missing:
                log.warning("task %r: connection(s) %s did not reach it within %.0fs: running it "
                            "for %s", spec.name, missing, self.group_wait, sorted(g.arrived))
            result = self.log.add(TaskResult(spec.name, spec.id, "on_execute",
                                             conids=sorted(g.arrived), seq=seq))
            try:
                argv = self.policy.resolve(spec, "on_execute")
            except TaskError as exc:
                result.state, result.error = "refused", str(exc)
                _logged(result)
                return result
            env = task_env(spec, "on_execute", SMIRROR_CONID=conid, SMIRROR_MAP_BASE=map_base,
                           SMIRROR_SEQ=seq,
                           SMIRROR_CONIDS=",".join(map(str, sorted(g.arrived))))
            return run_command(argv, env=env, cwd=map_base, timeout=spec.timeout, result=result)
        finally:
            g.done.set()
            with self._cond:
                # forget old groups; a late member of a finished group finds
                # it (and does not run the task again) for a while
                now = time.monotonic()
                for k in [k for k, x in self._groups.items()
                          if x.done.is_set() and now - x.first_arrival > 2 * self.group_wait + 3600]:
                    del self._groups[k]
