"""A bare source end of a link for the handoff tests: sends frames, reads ACKs."""
import socket
import threading
import time

from smirror.kernels.frames import encode_frame
from smirror.ops import Op
from smirror.stream import wire
from smirror.stream.wire import ACK


class Source:
    """The source end of a socketpair link into one TargetConnection.serve."""

    def __init__(self, target):
        a, b = socket.socketpair()
        self.link = wire.Link(a, "source")
        self.target_link = wire.Link(b, "target")
        self.served = threading.Thread(target=self._serve, args=(target,), daemon=True)
        self.error = None
        self.served.start()
        self.ready = self.link.recv_json(wire.MsgType.READY)[1]

    def _serve(self, target):
        try:
            target.serve(self.target_link)
        except Exception as exc:       # noqa: BLE001 - reported by the test
            self.error = exc

    def send_write(self, seq, path=b"f", offset=None, data=None):
        data = data if data is not None else bytes([seq % 256]) * 100
        offset = (seq - 1) * 100 if offset is None else offset
        self.link.send(wire.MsgType.FRAME, encode_frame([Op.write(seq, path, offset, data)], False))

    def ack(self, timeout):
        """The next ACK's seq, or None when none arrives within timeout."""
        self.link.sock.settimeout(timeout)
        try:
            mtype, payload = self.link.recv()
            while mtype == wire.MsgType.NOTICE:     # a resync asked (writes to a file never created)
                mtype, payload = self.link.recv()
        except TimeoutError:
            return None
        finally:
            self.link.sock.settimeout(None)
        assert mtype == wire.MsgType.ACK
        return ACK.unpack(payload)[0]

    def acks_until(self, seq, timeout=10):
        got = []
        deadline = time.monotonic() + timeout
        while not got or got[-1] < seq:
            a = self.ack(max(0.01, deadline - time.monotonic()))
            assert a is not None, f"no ACK up to {seq}; got {got}"
            got.append(a)
        return got

    def close(self):
        self.link.send(wire.MsgType.BYE)
        self.served.join(5)
        self.link.close()
