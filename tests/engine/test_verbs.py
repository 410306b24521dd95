"""The daemon's control verbs are one table: verb -> (role, handler)."""
from smirror.daemon.server import Daemon


def test_every_verb_has_a_role_and_a_handler():
    assert Daemon.VERBS, "the verb table is empty"
    for verb, (role, handler) in Daemon.VERBS.items():
        assert role in ("monitor", "admin", "replication"), (verb, role)
        assert callable(getattr(Daemon, handler, None)), f"{verb}: no method {handler}"


def test_the_reads_are_open_to_monitors_only_where_declared():
    roles = {verb: role for verb, (role, _) in Daemon.VERBS.items()}
    assert {v for v, r in roles.items() if r == "monitor"} == {"status", "repset.list", "conid"}
    assert {v for v, r in roles.items() if r == "replication"} == {"target.scan", "target.signature"}
