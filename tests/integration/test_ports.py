"""Malformed input on the daemon's port from peers that never log in:
oversized announcements, slow-loris headers, connect/close storms and random
bytes. The daemon (a real process) stays up and serving, its memory bounded
and its threads back to normal; before login it allocates only a small cap
and waits only a short time."""
import os
import random
import signal
import socket
import struct
import threading
import time

import psutil
import pytest

from smirror.daemon import control
from smirror.stream import wire
from smirror.stream.wire import MsgType
from support.daemons import PASSWORD, Node, wait_for

LOGIN_TIMEOUT = 1.5


@pytest.fixture
def node(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    n = Node(tmp_path, "d", env, extra=f'[login]\ntimeout = "{LOGIN_TIMEOUT}s"\n'
                                       'max_pending_per_peer = 64\n')
    n.add_user("admin", "admin")
    n.start()
    n.ps = psutil.Process(n.proc.pid)
    yield n
    if n.proc.poll() is None:
        n.kill(signal.SIGTERM)




def serves_a_login(node):
    with control.Client(node.address, timeout=30) as c:
        c.login("admin", PASSWORD)
        return c.call("status")["daemon"]


def settle(node):
    """Threads back to what an idle daemon has (every link thread ended)."""
    wait_for(lambda: node.ps.num_threads() <= node.idle_threads, what="link threads to end")


def raw(node, data=b"", timeout=10.0):
    s = socket.create_connection(("127.0.0.1", node.port))
    s.settimeout(timeout)
    if data:
        s.sendall(data)
    return s


def read_all(s):
    out = bytearray()
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


@pytest.fixture
def idle(node):
    serves_a_login(node)
    samples = []
    for _ in range(10):                   # the login's link thread may still be ending
        samples.append(node.ps.num_threads())
        time.sleep(0.05)
    node.idle_threads = min(samples)
    node.idle_rss = node.ps.memory_info().rss
    return node


def test_oversized_announcement_before_login_is_refused_with_its_size(idle):
    node = idle
    header = wire.HEADER.pack(wire.MAGIC, MsgType.HELLO, 0, 64 << 20)
    socks = [raw(node, header) for _ in range(10)]      # the 10 x 64 MiB
    try:
        for s in socks:
            data = read_all(s)
            mtype, length = data[2], struct.unpack("<I", data[4:8])[0]
            assert mtype == MsgType.ERROR
            text = data[8:8 + length].decode()
            assert f"announced a HELLO message of {64 << 20} bytes, over the 65536-byte limit " \
                   "before login" in text
    finally:
        for s in socks:
            s.close()
    assert node.ps.memory_info().rss < node.idle_rss + (32 << 20)
    settle(node)
    assert serves_a_login(node)


def test_after_login_the_normal_maximum_applies_and_links_may_idle(idle):
    node = idle
    with control.Client(node.address, timeout=30) as c:
        c.login("admin", PASSWORD)
        time.sleep(LOGIN_TIMEOUT + 0.5)       # idle past the login timeout: still there
        rules = [["exclude", "x" * 1000 + str(i), True] for i in range(200)]     # ~200 KiB
        with pytest.raises(control.RequestError, match="root must be an absolute path"):
            c.call("repset.create", name="big", root="relative/path", rules=rules)
        assert c.call("status")["daemon"]


def test_slow_loris_peers_are_dropped_after_the_login_timeout(idle):
    node = idle
    t0 = time.monotonic()
    partial = raw(node, b"SM\x01")                                     # part of a header
    header_only = raw(node, wire.HEADER.pack(wire.MAGIC, MsgType.HELLO, 0, 100) + b"{")
    silent = raw(node)
    trickle = raw(node)
    # one byte a while: each read is quick, the whole login is not
    hello = wire.HEADER.pack(wire.MAGIC, MsgType.HELLO, 0, 200)
    try:
        for b in hello:
            trickle.sendall(bytes([b]))
            time.sleep(0.1)
    except OSError:
        pass
    for s in (partial, header_only, silent, trickle):
        data = read_all(s)                # ends when the daemon drops the peer
        assert b"did not finish logging in in time" in data
        s.close()
    assert time.monotonic() - t0 < LOGIN_TIMEOUT + 10
    settle(node)
    assert serves_a_login(node)


def test_connect_close_storm_leaves_threads_and_memory_alone(idle):
    node = idle
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", node.port))
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # reset
        s.close()
    settle(node)
    assert node.ps.memory_info().rss < node.idle_rss + (16 << 20)
    assert node.proc.poll() is None and serves_a_login(node)


def test_random_bytes_on_the_port(idle):
    node = idle
    rng = random.Random(7)
    sent = 0
    while sent < 1 << 20:                        # 1 MB of random bytes, in many peers
        chunk = rng.randbytes(rng.choice((1, 7, 8, 100, 4096, 65536)))
        if rng.random() < 0.3:                   # a valid magic then garbage
            chunk = b"SM" + chunk
        try:
            with socket.create_connection(("127.0.0.1", node.port)) as s:
                s.sendall(chunk)
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass                                 # the daemon closed on us: fine
        sent += len(chunk)
    settle(node)
    assert node.ps.memory_info().rss < node.idle_rss + (32 << 20)
    assert node.proc.poll() is None and serves_a_login(node)
    assert "Traceback" not in node.log()


def test_tls_peers_that_never_finish_the_handshake_are_dropped(tmp_path):
    from support.daemons import make_certs
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    node = Node(tmp_path, "tls", env, tls_dir=certs, extra=f'[login]\ntimeout = "{LOGIN_TIMEOUT}s"\n')
    node.add_user("admin", "admin")
    node.start()
    try:
        t0 = time.monotonic()
        silent = raw(node)
        half = raw(node, b"\x16\x03\x01\x00\xff\x01")       # the start of a ClientHello
        for s in (silent, half):
            read_all(s)                                   # ends when the daemon drops it
            s.close()
        assert time.monotonic() - t0 < LOGIN_TIMEOUT + 10
        wait_for(lambda: node.log().count("TLS handshake failed") >= 2, what="the drops logged")
    finally:
        node.kill(signal.SIGTERM)


@pytest.mark.slow
def test_replication_goes_on_while_the_targets_port_is_abused(tmp_path):
    """Existing connections keep replicating while unauthenticated peers
    storm the target's port (connect/close, random bytes, stalled headers)."""
    from support.pair import replicate_data, running_pair, wait_same
    with running_pair(tmp_path, target_extra='[login]\ntimeout = "2s"\n') as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        stop = False

        def abuse():
            rng = random.Random(3)
            stalled = []
            while not stop:
                try:
                    s = socket.create_connection(("127.0.0.1", target.port))
                    kind = rng.randrange(3)
                    if kind == 0:
                        s.sendall(rng.randbytes(rng.randrange(1, 5000)))
                    elif kind == 1:
                        s.sendall(wire.HEADER.pack(wire.MAGIC, MsgType.HELLO, 0, 1000))
                        stalled.append(s)
                        if len(stalled) > 20:          # a few at a time, like a real slow-loris
                            stalled.pop(0).close()
                        continue
                    s.close()
                except OSError:
                    pass
            for s in stalled:
                s.close()
        abuser = threading.Thread(target=abuse, daemon=True)
        abuser.start()
        try:
            for i in range(20):
                (src / f"during-{i}.txt").write_text(f"written while the port is abused {i}\n" * 100)
                time.sleep(0.05)
            assert wait_same(src, dst, 60), source.log()[-3000:] + target.log()[-3000:]
        finally:
            stop = True
            abuser.join(30)
        assert target.proc.poll() is None and "Traceback" not in target.log()
