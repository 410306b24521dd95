"""A source and a target to run a workload against: both engines in this
process (``embedded``), or two ``smirror serve`` daemons as processes on
127.0.0.1 (``daemons``). Each pair offers the same small surface to the
runner: a writer, status figures, pause/resume, lag probes, process ids."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from smirror.errors import BenchError, SmirrorError

from . import limits
from .workloads import RecorderWriter, Writer

PROBE_DIR = ".smbench-probes"


class EmbeddedPair:
    """``smirror.Replication`` with library-API capture: source and target
    engines in this process, joined by a socket pair."""

    mode = "embedded"
    shared_process = True

    def __init__(self, work: Path, source_memory: int, target_memory: int, disk: int):
        from smirror.replication import Replication
        self.src, self.dst = work / "src", work / "dst"
        self.src.mkdir()
        self.rep = Replication(self.src, self.dst, capture="api", mirror="none",
                               state_dir=work / "state",
                               **limits.replication_kwargs(source_memory, target_memory, disk))
        self.rep.start()
        journal = self.rep.journal
        if journal is None:
            raise BenchError("the embedded pair started without its library capture (capture='api')")
        self.journal = journal
        self.writer = RecorderWriter(journal)
        self.pids = (os.getpid(), os.getpid())
        self.lags: list[float] = []
        self._sent: dict[bytes, float] = {}
        self.rep.target.applier.on_mark = self._on_mark

    def _on_mark(self, op) -> None:
        sent = self._sent.pop(bytes(op.path), None)
        if sent is not None:
            self.lags.append(time.monotonic() - sent)

    def probe(self, i: int) -> None:
        label = b"smbench-%d" % i
        self._sent[label] = time.monotonic()
        self.journal.mark(label)

    def probes_missing(self) -> int:
        return len(self._sent)

    def status(self) -> dict:
        s = self.rep.status()
        return {"seq_captured": s["seq_captured"], "seq_applied": s["seq_applied"],
                "source_queue_mem": s["source_queue_mem"], "source_queue_disk": s["source_queue_disk"],
                "target_queue_mem": s["target_queue_mem"], "target_queue_disk": s["target_queue_disk"],
                "bytes_sent": s["bytes_sent"], "auto_disconnects": 0,
                "source_spilled": self.rep.queue.stats()["spilled"],
                "target_spilled": self.rep.target.queue.stats()["spilled"],
                "error": s["error"]}

    def pause_target(self) -> None:
        self.rep.pause_target()

    def resume_target(self) -> None:
        self.rep.resume_target()

    def wait_drained(self, timeout: float) -> bool:
        return self.rep.wait(timeout)

    def close(self) -> None:
        self.rep.stop(drain=False)


class DaemonPair:
    """Two ``smirror serve`` processes: the source watches SRC (a
    replication set) and streams it to the target's map base DST."""

    mode = "daemons"
    shared_process = False
    PROBE_POLL = 0.002

    def __init__(self, work: Path, source_memory: int, target_memory: int, disk: int):
        from smirror.daemon.control import Client
        self.work = work
        self.src, self.dst = work / "src", work / "dst"
        self.src.mkdir()
        (self.src / PROBE_DIR).mkdir()
        self.password = secrets.token_urlsafe(16)
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config"), "SMBENCH_PW": self.password}
        self.procs: list[subprocess.Popen] = []
        self._locks = (threading.Lock(), threading.Lock())
        try:
            self.source_addr = self._start("source", limits.daemon_config("source", source_memory, disk),
                                           links=True)
            self.target_addr = self._start("target", limits.daemon_config("target", target_memory, disk)
                                           + f'[target]\nallowed_roots = ["{work}"]\n',
                                           repl_user=True)
            self.source = Client(self.source_addr).login("admin", self.password)
            self.target = Client(self.target_addr).login("admin", self.password)
            self._call(0, "repset.create", name="bench", root=str(self.src))
            self._call(0, "connect", repset="bench", target=self.target_addr, map_base=str(self.dst))
            deadline = time.monotonic() + 60
            while self._source_row().get("state") != "connected":
                if time.monotonic() > deadline:
                    raise BenchError(f"the source daemon did not connect: {self._source_row()}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.writer = Writer(self.src)
        self.pids = (self.procs[0].pid, self.procs[1].pid)
        self.lags: list[float] = []
        self._sent: dict[int, float] = {}
        self._sent_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_probes, daemon=True, name="smbench-probes")
        self._poller.start()

    def _start(self, name: str, config: str, links: bool = False, repl_user: bool = False) -> str:
        d = self.work / name
        d.mkdir()
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        text = (f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{d / "state"}"\n'
                f'log_file = "{d / "log"}"\n[reconnect]\nretry_interval = "200ms"\n' + config)
        if links:
            pw = d / "link-password"
            pw.write_text(self.password)
            os.chmod(pw, 0o600)
            text += f'[links]\nuser = "repl"\npassword_file = "{pw}"\n'
        cfg = d / "smirror.toml"
        cfg.write_text(text)
        users = [("admin", "admin")] + ([("repl", "replication")] if repl_user else [])
        for user, role in users:
            r = subprocess.run([sys.executable, "-m", "smirror", "user", "add", user, "--role", role,
                                "--password-env", "SMBENCH_PW", "--config", str(cfg)],
                               env=self.env, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise BenchError(f"smirror user add {user} for the {name} daemon: {r.stderr.strip()}")
        proc = subprocess.Popen([sys.executable, "-m", "smirror", "serve", "--config", str(cfg)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stderr is not None     # both are PIPEs
        line = proc.stdout.readline()
        if "listening" not in line:
            proc.wait(10)
            raise BenchError(f"the {name} daemon did not start: {proc.stderr.read().strip()[-2000:]}")
        return f"127.0.0.1:{port}"

    def _call(self, side: int, verb: str, **args):
        with self._locks[side]:
            return (self.source, self.target)[side].call(verb, **args)

    def _source_row(self) -> dict:
        rows = self._call(0, "status")["sources"]
        return rows[0] if rows else {}

    def _target_row(self) -> dict:
        rows = self._call(1, "status")["targets"]
        return rows[0] if rows else {}

    def status(self) -> dict:
        s, t = self._source_row(), self._target_row()
        return {"seq_captured": s.get("seq_captured", 0), "seq_applied": t.get("seq_applied", 0),
                "source_queue_mem": s.get("queue_mem_bytes", 0),
                "source_queue_disk": s.get("queue_disk_bytes", 0),
                "target_queue_mem": t.get("queue_mem_bytes", 0) + t.get("handoff_bytes", 0),
                "target_queue_disk": t.get("queue_disk_bytes", 0),
                "bytes_sent": s.get("bytes_sent", 0),
                "auto_disconnects": s.get("auto_disconnects", 0),
                # the daemons' status does not say how many frames spilled
                "source_spilled": None, "target_spilled": None,
                "error": s.get("last_error", "") or t.get("error", "")}

    def probe(self, i: int) -> None:
        with self._sent_lock:
            self._sent[i] = time.monotonic()
        with open(self.src / PROBE_DIR / f"p{i}", "wb") as f:
            f.write(b"%d\n" % i)

    def _poll_probes(self) -> None:
        while not self._stop.wait(self.PROBE_POLL):
            with self._sent_lock:
                waiting = sorted(self._sent)
            for i in waiting:
                if not os.path.exists(self.dst / PROBE_DIR / f"p{i}"):
                    break            # in order: later probes come after this one
                now = time.monotonic()
                with self._sent_lock:
                    self.lags.append(now - self._sent.pop(i))

    def probes_missing(self) -> int:
        return len(self._sent)

    def pause_target(self) -> None:
        self._call(1, "pause-target")

    def resume_target(self) -> None:
        self._call(1, "resume-target")

    def wait_drained(self, timeout: float) -> bool:
        """Until the watcher saw everything (a quiet moment) and the target
        applied it: the trees match and the applied seq stays put."""
        from .verify import compare_trees
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st["seq_applied"] >= st["seq_captured"] and not compare_trees(self.src, self.dst, limit=1):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop_poller()
        for c in ("source", "target"):
            client = getattr(self, c, None)
            if client is not None:
                try:
                    client.close()
                except (OSError, SmirrorError):
                    pass
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()

    def _stop_poller(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._poller.join(5)


def open_pair(mode: str, work: Path, source_memory: int, target_memory: int, disk: int):
    if mode == "embedded":
        return EmbeddedPair(work, source_memory, target_memory, disk)
    if mode == "daemons":
        return DaemonPair(work, source_memory, target_memory, disk)
    raise BenchError(f"--mode must be embedded or daemons, got {mode!r}")
