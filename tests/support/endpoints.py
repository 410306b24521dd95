"""A receiver on a real TCP link in the test's own process, and frames
built by hand (the encoder would refuse the ops they carry)."""
from __future__ import annotations

import socket
import struct
import threading

import xxhash

from smirror.ops import OpKind
from smirror.stream import wire


class TargetEndpoint:
    """A listening socket that hands each data link to one TargetConnection."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors = []
        self.links = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        self.links += 1
        with wire.Link(conn) as link:
            try:
                _, opened = link.recv_json(wire.MsgType.OPEN)
                assert opened["conid"] == self.target.conid
                self.target.serve(link, order=opened.get("order"),
                                  durable=opened.get("durable") is True)
            except Exception as exc:       # noqa: BLE001 - kept for the test to look at
                self.errors.append(exc)

    def dial(self):
        return wire.connect("127.0.0.1", self.port)

    def close(self):
        self.sock.close()


def settle(journal, sender, target, timeout=30):
    journal.flush()
    assert sender.wait_acked(journal.last_seq, timeout), sender.status()
    assert target.wait_applied(journal.last_seq, timeout), target.status()


class Endpoint(TargetEndpoint):
    """TargetEndpoint (each link, after its OPEN, to ``target``),
    and a source's side of a link to it."""

    def open(self):
        """A source's side of a data link: (link, the READY's last_seq)."""
        link = wire.connect("127.0.0.1", self.port)
        link.send_json(wire.MsgType.OPEN, {"conid": self.target.conid, "map_base": "x",
                                           "source": "test", "next_seq": 1})
        _, ready = link.recv_json(wire.MsgType.READY)
        return link, ready["last_seq"]


# -- frames built by hand ---------------------------------------------------------

_FIXED = {OpKind.WRITE: "<Q", OpKind.TRUNCATE: "<Q", OpKind.CREATE: "<I",
          OpKind.MKDIR: "<I", OpKind.SETATTR: "<IIIq"}


def record(kind, seq, path=b"", path2=b"", data=b"", fixed=(), mask=0) -> bytes:
    fmt = _FIXED.get(kind)
    body = struct.pack(fmt, *fixed) if fmt else b""
    return (struct.pack("<BBHHIQ", kind, mask, len(path), len(path2), len(data), seq)
            + body + path + path2 + data)


def raw_frame(records: list[tuple[int, bytes]]) -> bytes:
    """A well-formed, checksummed, uncompressed frame of (seq, record) pairs,
    whatever the records say."""
    payload = b"".join(r for _, r in records)
    head = struct.pack("<4sBBHIIIIQQQ", b"SMJF", 1, 0, 0, len(records), len(payload),
                       len(payload), 0, records[0][0], records[-1][0],
                       xxhash.xxh3_64_intdigest(payload))
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + payload
