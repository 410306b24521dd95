"""Malformed control requests, as any peer could send them over a logged-in
control link: each gets an error reply that names what is wrong, and the
link stays usable (before, a list where a name goes, or args that are not
a table, ended the link with 'internal error: TypeError ...')."""
import os
import signal

import pytest

from smirror.daemon.control import Client
from smirror.stream import wire
from support.daemons import PASSWORD, Node


@pytest.fixture
def admin(tmp_path):
    node = Node(tmp_path, "solo", {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    node.add_user("admin", "admin")
    node.start()
    client = Client(node.address).login("admin", PASSWORD)
    yield node, client
    client.close()
    node.kill(signal.SIGTERM)


def _ask(client, verb, args):
    client.link.send_json(wire.MsgType.REQUEST, {"id": 7, "verb": verb, "args": args})
    _, reply = client.link.recv_json(wire.MsgType.REPLY)
    return reply


@pytest.mark.parametrize("verb,args,error", [
    (["status"], {}, "a request is a verb (a string) with args (a table), got verb ['status']"),
    ("connect", [1], "a request is a verb (a string) with args (a table), got verb 'connect' and args [1]"),
    ("repset.delete", {"name": ["a"]}, "no replication set ['a']"),
    ("connect", {"repset": {"a": 1}, "target": "127.0.0.1:9", "map_base": "/m"},
     "no replication set {'a': 1}"),
    ("conid", {"repset": "x", "target": "127.0.0.1:9", "map_base": 5},
     "map base must be a path on the target, got 5"),
    ("connect", {"options": ["x"]}, "connection options must be a table of option = value, got ['x']"),
    ("connection.set", {"conid": float("inf")}, "no connection with id inf"),
    ("disconnect", {"conid": [1]}, "no connection with id [1]"),
])
def test_a_malformed_request_gets_an_error_naming_it_and_the_link_goes_on(admin, verb, args, error):
    node, client = admin
    reply = _ask(client, verb, args)
    assert reply["ok"] is False and error in reply["error"], reply
    assert client.call("status") is not None          # the same link still answers
    assert "internal error" not in node.log() and "Traceback" not in node.log()
