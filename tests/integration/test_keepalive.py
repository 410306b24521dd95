"""A peer that vanishes without a word (power loss, a cut cable) is found:
every link's socket has TCP keepalive on both ends, so an idle link to a dead
peer ends within about 90 s instead of TCP's two hours (docs/convergence.md)."""
import os
import shutil
import signal
import socket
import subprocess

import pytest

from smirror.stream import wire
from support.daemons import Node, wait_for


def test_a_client_link_has_keepalive_with_the_stated_timers():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        link = wire.connect("127.0.0.1", server.getsockname()[1])
        peer, _ = server.accept()
        try:
            sock = link.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == wire.KEEPALIVE_IDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == wire.KEEPALIVE_INTERVAL
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == wire.KEEPALIVE_COUNT
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            # found within about 90 s, not two hours
            assert wire.KEEPALIVE_IDLE + wire.KEEPALIVE_INTERVAL * wire.KEEPALIVE_COUNT <= 120
        finally:
            peer.close()
            link.close()
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_daemons_end_of_a_link_has_keepalive(tmp_path):
    """Seen from outside, as the kernel reports it: the daemon's accepted
    socket runs a keepalive timer (ss -o), on a link left idle."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    node = Node(tmp_path, "d", env)
    node.add_user("admin", "admin")
    node.start()
    link = wire.connect("127.0.0.1", node.port)
    try:
        client_port = link.sock.getsockname()[1]

        def daemon_side_timer():
            out = subprocess.run(["ss", "-tnoH", "state", "established",
                                  f"( sport = :{node.port} and dport = :{client_port} )"],
                                 capture_output=True, text=True).stdout
            return out if "keepalive" in out else None
        wait_for(daemon_side_timer, timeout=30, what="a keepalive timer on the daemon's socket")
    finally:
        link.close()
        node.kill(signal.SIGTERM)
