"""A userspace netem: loss, delay with jitter, reordering, duplication and
link-down periods on the packets between two network namespaces.

This kernel has no ``sch_netem`` (``tc qdisc add ... netem`` answers
"Specified qdisc kind is unknown", no loadable modules) and no tc ``gact``
action, but it has TUN devices. So each namespace gets a TUN device with a
point-to-point address, and a forwarder process (``forward`` below) holds
both devices' file descriptors and moves every IP packet from one to the
other, deciding per packet (a seeded random generator) to drop it, delay it,
let it overtake, or send it twice. The packets are the real ones the two
kernels' TCP stacks exchange: nothing above IP knows.

    with NetemPair("t1") as pair:          # namespaces smn-t1a and smn-t1b
        pair.set(loss=0.05, delay_ms=50, jitter_ms=20)
        pair.down(); pair.up()             # a link flap: every packet dropped meanwhile
        pair.stats()                       # counters of the forwarder

    python tools/netem.py measure          # the figures that show it does what it says

Semantics, per packet and per direction (like netem's):
- ``loss`` p: dropped with probability p;
- ``duplicate`` p: with probability p a second copy follows (its own delay);
- ``delay_ms`` / ``jitter_ms``: held for normal(delay, jitter) ms (>= 0):
  independent per packet, so jitter alone reorders a little, as netem does;
- ``reorder`` p: with probability p the packet is sent at once, overtaking
  the delayed ones (netem's ``reorder p``; needs a delay to mean anything);
- link down: every packet dropped (a cut cable: no RST, no ICMP), until up;
- ``cut()``: the established TCP connections between the two are aborted on
  both sides (``ss -K``), as a middlebox that lost its state would leave them.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
FAULTS = ("loss", "delay_ms", "jitter_ms", "reorder", "duplicate")


# -- namespaces -----------------------------------------------------------------

def _setns(fd: int) -> None:
    if hasattr(os, "setns"):                # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str):
    """The calling thread inside network namespace NAME for the block:
    sockets and TUN devices made there belong to it (and keep belonging to
    it after the block)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def _ip(*args, ns=None):
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def open_tun(ns: str, ifname: str) -> int:
    """A new TUN device IFNAME (IP packets, no packet-info header) in
    namespace NS; returns its file descriptor (the device lives while it
    is open)."""
    with in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
    return fd


def unavailable() -> str:
    """Why a NetemPair cannot be made here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (kernel without CONFIG_TUN)"
    import shutil
    for tool in ("ip", "ss"):
        if not shutil.which(tool):
            return f"needs {tool} (iproute2)"
    name = f"smnprobe{os.getpid() % 100000}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    try:
        os.close(open_tun(name, "smnprobe"))
    except OSError as exc:
        return f"cannot create a TUN device in a namespace: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


# -- the forwarder ------------------------------------------------------------------

class Forwarder:
    """Moves packets between two TUN descriptors, with faults. Runs in its
    own process (``forward`` below): control lines on stdin, answers on
    stdout, so the scheduling of a test process never delays packets."""

    def __init__(self, fd_a: int, fd_b: int, seed: int = 1):
        self.fds = (fd_a, fd_b)
        self.rng = random.Random(seed)
        self.faults = dict.fromkeys(FAULTS, 0.0)
        self.link_up = True
        self.held: list = []            # heap of (release time, n, out fd, packet)
        self._n = 0
        self.counts = dict.fromkeys(("in", "out", "lost", "down_dropped", "duplicated",
                                     "reordered", "delayed", "write_errors"), 0)

    def set(self, **faults) -> None:
        for k, v in faults.items():
            if k not in FAULTS:
                raise ValueError(f"unknown fault {k!r} (known: {', '.join(FAULTS)})")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"fault {k}={v!r}: not a number") from None
            if v < 0 or (k in ("loss", "reorder", "duplicate") and v > 1):
                raise ValueError(f"fault {k}={v}: out of range")
            self.faults[k] = v

    def _take(self, pkt: bytes, out: int, now: float) -> None:
        self.counts["in"] += 1
        f, rng = self.faults, self.rng
        if not self.link_up:
            self.counts["down_dropped"] += 1
            return
        if f["loss"] and rng.random() < f["loss"]:
            self.counts["lost"] += 1
            return
        copies = 1
        if f["duplicate"] and rng.random() < f["duplicate"]:
            copies = 2
            self.counts["duplicated"] += 1
        for _ in range(copies):
            if f["reorder"] and f["delay_ms"] and rng.random() < f["reorder"]:
                self.counts["reordered"] += 1
                delay = 0.0
            else:
                delay = max(0.0, rng.gauss(f["delay_ms"], f["jitter_ms"])) / 1000 if f["delay_ms"] else 0.0
            if delay <= 0:
                self._write(out, pkt)
            else:
                self.counts["delayed"] += 1
                self._n += 1
                heapq.heappush(self.held, (now + delay, self._n, out, pkt))

    def _write(self, fd: int, pkt: bytes) -> None:
        try:
            os.write(fd, pkt)
            self.counts["out"] += 1
        except OSError:                 # the device's queue is full, or it went down: lost
            self.counts["write_errors"] += 1

    def _release(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, out, pkt = heapq.heappop(self.held)
            if self.link_up:
                self._write(out, pkt)
            else:                       # the link went down while it was in flight
                self.counts["down_dropped"] += 1

    def command(self, line: str) -> dict:
        words = line.split()
        if not words:
            return {}
        verb, args = words[0], words[1:]
        if verb == "set":
            bad = [a for a in args if "=" not in a]
            if bad:
                raise ValueError(f"set {bad[0]!r}: expected NAME=VALUE")
            self.set(**dict(a.split("=", 1) for a in args))
        elif verb == "down":
            self.link_up = False
        elif verb == "up":
            self.link_up = True
        elif verb == "reset-counts":
            self.counts = dict.fromkeys(self.counts, 0)
        elif verb != "stats":
            raise ValueError(f"unknown command {verb!r} (set, down, up, stats, reset-counts)")
        return {"ok": True, "faults": self.faults, "up": self.link_up, "held": len(self.held),
                **self.counts}

    def run(self, control) -> None:
        a, b = self.fds
        peer = {a: b, b: a}
        cfd = control.fileno()
        poller = select.poll()
        for fd in (a, b, cfd):
            poller.register(fd, select.POLLIN)
        buf = b""
        while True:
            now = time.monotonic()
            self._release(now)
            timeout = max(0.0, self.held[0][0] - now) * 1000 if self.held else 1000
            for fd, ev in poller.poll(timeout):
                if fd == cfd:
                    chunk = os.read(cfd, 4096)
                    if not chunk:
                        return              # the controller went away: so does the link
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        try:
                            answer = self.command(line.decode())
                        except ValueError as exc:
                            answer = {"ok": False, "error": str(exc)}
                        sys.stdout.write(json.dumps(answer) + "\n")
                        sys.stdout.flush()
                    continue
                now = time.monotonic()
                if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    return                  # a device went away: the pair is being taken down
                for _ in range(64):         # a burst, then look at the others again
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    self._take(pkt, peer[fd], now)


# -- the pair --------------------------------------------------------------------

class NetemPair:
    """Two network namespaces, ``{prefix}a`` and ``{prefix}b``, joined by a
    forwarder with faults; address ``addr_a`` in the first, ``addr_b`` in
    the second (point to point, nothing else routed: the traffic never
    leaves these namespaces)."""

    def __init__(self, tag: str, seed: int = 1):
        self.tag = tag
        self.ns_a, self.ns_b = f"smn-{tag}a", f"smn-{tag}b"
        # each pair's namespaces hold only its TUN devices: the same
        # addresses in every pair never meet
        self.addr_a, self.addr_b = "10.253.0.1", "10.253.0.2"
        self.seed = seed
        self.proc = None
        self._made: list = []           # namespaces this pair created (and so deletes)
        self._lock = threading.Lock()

    def __enter__(self):
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _make(self) -> None:
        fds = []
        try:
            for ns, here, there in ((self.ns_a, self.addr_a, self.addr_b),
                                    (self.ns_b, self.addr_b, self.addr_a)):
                _ip("netns", "add", ns)
                self._made.append(ns)
                fds.append(open_tun(ns, "smtun"))
                os.set_blocking(fds[-1], False)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("addr", "add", here, "peer", there, "dev", "smtun", ns=ns)
                _ip("link", "set", "smtun", "up", ns=ns)
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "forward", "--fds", f"{fds[0]},{fds[1]}",
                 "--seed", str(self.seed)],
                pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        finally:
            for fd in fds:                  # the forwarder holds them now
                os.close(fd)
        self.stats()                        # it answers: it runs

    def _ask(self, line: str) -> dict:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"netem forwarder of {self.tag} is not running")
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = json.loads(self.proc.stdout.readline())
        if not answer.get("ok"):
            raise ValueError(f"netem {line!r}: {answer.get('error')}")
        return answer

    def set(self, **faults) -> dict:
        """Replace the named faults (the others stay): loss, duplicate,
        reorder (0..1), delay_ms, jitter_ms."""
        return self._ask("set " + " ".join(f"{k}={v}" for k, v in faults.items()))

    def clear(self) -> dict:
        return self.set(**dict.fromkeys(FAULTS, 0))

    def down(self) -> dict:
        return self._ask("down")

    def up(self) -> dict:
        return self._ask("up")

    def stats(self) -> dict:
        return self._ask("stats")

    def cut(self) -> int:
        """Abort every established TCP connection between the two
        namespaces, on both sides (``ss -K``: what a middlebox losing its
        state or a peer's reset does); their resets cross the link only if
        it is up. Returns how many sockets were aborted."""
        n = 0
        for ns, peer in ((self.ns_a, self.addr_b), (self.ns_b, self.addr_a)):
            proc = subprocess.run(["ip", "netns", "exec", ns, "ss", "-K", "-t", "-n", "-H",
                                   "state", "established", "dst", peer],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ss -K in {ns}: {proc.stderr.strip()}")
            n += len([line for line in proc.stdout.splitlines() if line.strip()])
        return n

    def reset_counts(self) -> dict:
        return self._ask("reset-counts")

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)


# -- measuring it -------------------------------------------------------------------

def probe_udp(pair: NetemPair, count: int = 2000, gap: float = 0.002) -> dict:
    """COUNT numbered datagrams from a to b, one every GAP s; what b
    received: loss, duplicates, reordered arrivals, one-way delay (the two
    namespaces share one monotonic clock)."""
    with in_netns(pair.ns_b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(pair.ns_a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((pair.addr_b, 0))
        rx.settimeout(0.5)
        dest = rx.getsockname()
        got: list = []

        def receive():
            while True:
                try:
                    data = rx.recv(64)
                except TimeoutError:
                    if done.is_set():
                        return
                    continue
                seq, sent = struct.unpack("<Id", data)
                got.append((seq, time.monotonic() - sent))

        done = threading.Event()
        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        for i in range(count):
            tx.sendto(struct.pack("<Id", i, time.monotonic()), dest)
            time.sleep(gap)
        time.sleep(0.5)                    # the last ones in flight
        done.set()
        reader.join()
    seqs = [s for s, _ in got]
    unique = set(seqs)
    # overtook: arrived before a datagram that was sent before it
    later_min, overtook = float("inf"), 0
    for s in reversed(seqs):
        if later_min < s:
            overtook += 1
        later_min = min(later_min, s)
    delays = sorted(d * 1000 for _, d in got)
    return {"sent": count, "received": len(seqs), "lost": count - len(unique),
            "loss_pct": round(100 * (count - len(unique)) / count, 2),
            "duplicates": len(seqs) - len(unique),
            "dup_pct": round(100 * (len(seqs) - len(unique)) / count, 2),
            "overtook": overtook, "overtook_pct": round(100 * overtook / max(1, len(seqs)), 2),
            "delay_ms_p50": round(delays[len(delays) // 2], 2) if delays else None,
            "delay_ms_p10": round(delays[len(delays) // 10], 2) if delays else None,
            "delay_ms_p90": round(delays[len(delays) * 9 // 10], 2) if delays else None}


def probe_tcp_rtt(pair: NetemPair, rounds: int = 50) -> dict:
    """RTT of a 1-byte request/answer over one TCP connection a -> b."""
    with in_netns(pair.ns_b):
        srv = socket.socket()
    with in_netns(pair.ns_a):
        cli = socket.socket()
    with srv, cli:
        srv.bind((pair.addr_b, 0))
        srv.listen(1)

        def echo():
            conn, _ = srv.accept()
            with conn:
                while (data := conn.recv(1)):
                    conn.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        t0 = time.monotonic()
        cli.settimeout(30)
        cli.connect(srv.getsockname())
        connect_ms = (time.monotonic() - t0) * 1000
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(rounds):
            t = time.monotonic()
            cli.sendall(b"x")
            if cli.recv(1) != b"x":
                raise RuntimeError("TCP echo broke")
            rtts.append((time.monotonic() - t) * 1000)
    rtts.sort()
    return {"connect_ms": round(connect_ms, 1), "rtt_ms_p50": round(rtts[len(rtts) // 2], 2),
            "rtt_ms_p90": round(rtts[len(rtts) * 9 // 10], 2)}


def probe_flap(pair: NetemPair, down_s: float = 1.0) -> dict:
    """Datagrams sent while the link is down arrive? (they must not)"""
    pair.down()
    try:
        lost = probe_udp(pair, count=100, gap=down_s / 100)
    finally:
        pair.up()
    return {"down_s": down_s, "sent": lost["sent"], "received_while_down": lost["received"]}


MEASURE = [
    ("none", {}),
    ("loss 5%", {"loss": 0.05}),
    ("delay 50 ms +- 20 ms", {"delay_ms": 50, "jitter_ms": 20}),
    ("reorder 25% (delay 50 ms)", {"delay_ms": 50, "reorder": 0.25}),
    ("duplicate 5%", {"duplicate": 0.05}),
]


def measure(seed: int = 1, count: int = 2000) -> list:
    rows = []
    with NetemPair(f"m{os.getpid() % 1000}", seed=seed) as pair:
        for name, faults in MEASURE:
            pair.clear()
            pair.set(**faults)
            pair.reset_counts()
            udp = probe_udp(pair, count)
            tcp = probe_tcp_rtt(pair)
            st = pair.stats()
            rows.append({"faults": name, **udp, **tcp,
                         "forwarder": {k: st[k] for k in ("in", "lost", "duplicated", "reordered")}})
        pair.clear()
        rows.append({"faults": "link down 1 s", **probe_flap(pair)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="netem.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward", help="(internal) the forwarder process of a NetemPair")
    f.add_argument("--fds", required=True)
    f.add_argument("--seed", type=int, default=1)
    m = sub.add_parser("measure", help="measure loss, delay, reordering, duplication, flaps")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--count", type=int, default=2000)
    m.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "forward":
        a, b = (int(x) for x in args.fds.split(","))
        Forwarder(a, b, args.seed).run(sys.stdin)
        return 0
    why = unavailable()
    if why:
        print(f"netem.py: {why}", file=sys.stderr)
        return 2
    rows = measure(args.seed, args.count)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| faults | UDP sent | loss % | dup % | overtook % | one-way ms p10/p50/p90 | TCP RTT ms p50/p90 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[:-1]:
        print(f"| {r['faults']} | {r['sent']} | {r['loss_pct']} | {r['dup_pct']} | {r['overtook_pct']} | "
              f"{r['delay_ms_p10']}/{r['delay_ms_p50']}/{r['delay_ms_p90']} | "
              f"{r['rtt_ms_p50']}/{r['rtt_ms_p90']} |")
    r = rows[-1]
    print(f"\nlink down {r['down_s']} s: {r['sent']} datagrams sent, {r['received_while_down']} arrived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
