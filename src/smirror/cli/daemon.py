"""CLI verbs of the daemon and its control protocol: ``serve``, ``user``,
``login``, ``logout``, ``repset``, ``connect``, ``conid``, ``disconnect``,
``status``. Passwords come from a prompt, ``--password-stdin`` or
``--password-env VAR``, never from an argument (visible in ``ps``). Control
links use TLS when ``SMIRROR_TLS_CA`` (and, for a daemon that wants client
certificates, ``SMIRROR_TLS_CERT`` and ``SMIRROR_TLS_KEY``) are set, and
with a host that ``smirror login`` reached over TLS (the session remembers
it); a host beyond loopback is logged in to only over TLS."""
from __future__ import annotations

import os
import sys

from smirror.daemon.config import DEFAULT_PORT
from smirror.errors import EXIT_FAILED, EXIT_OK

DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


def _password(args, confirm=False) -> str:
    from smirror.daemon.auth import password_from
    if args.password_env:
        return password_from(env=args.password_env)
    if args.password_stdin:
        return password_from(stdin=sys.stdin)
    return password_from(prompt=True, confirm=confirm)


def _password_options(p) -> None:
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--password-env", metavar="VAR", help="read the password from environment variable VAR")


def _host_option(p) -> None:
    p.add_argument("--host", default=os.environ.get("SMIRROR_HOST", DEFAULT_ADDRESS), metavar="HOST[:PORT]",
                   help=f"daemon to talk to (default $SMIRROR_HOST or {DEFAULT_ADDRESS})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon (source and target roles)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see 'smirror config-defaults')")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--listen", metavar="HOST:PORT")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run_serve)

    p = sub.add_parser("config-defaults", help="print the default configuration as commented TOML")
    p.set_defaults(run=lambda args: print(__import__("smirror.daemon.config").config.defaults_toml(),
                                          end="") or 0)

    p = sub.add_parser("user", help="manage the daemon's users (on its state directory)")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?")
    p.add_argument("--role", choices=("admin", "monitor", "replication"), default="monitor",
                   help="admin: everything; monitor: read status; replication: the link user a "
                        "source daemon logs in as (data links only)")
    p.add_argument("--source", metavar="ID",
                   help="with --role replication: bind the user to this source daemon id "
                        "(its STATE_DIR/daemon-id) now, instead of to the first one that uses it")
    p.add_argument("--replace", action="store_true", help="change an existing user")
    p.add_argument("--state-dir", metavar="DIR", default=None)
    p.add_argument("--config", metavar="FILE")
    _password_options(p)
    p.set_defaults(run=run_user)

    p = sub.add_parser("login", help="log in to a daemon and keep the session for later verbs")
    p.add_argument("address", nargs="?", default=os.environ.get("SMIRROR_HOST", DEFAULT_ADDRESS))
    p.add_argument("--user", "-u", required=True)
    _password_options(p)
    p.set_defaults(run=run_login)

    p = sub.add_parser("logout", help="end the saved session of a daemon (on the daemon too)")
    p.add_argument("address", nargs="?", default=os.environ.get("SMIRROR_HOST", DEFAULT_ADDRESS))
    p.set_defaults(run=run_logout)

    p = sub.add_parser("repset", help="replication sets: create, list, delete")
    p.add_argument("action", choices=("create", "list", "delete"))
    p.add_argument("name", nargs="?")
    p.add_argument("--root", help="source directory of the set (create)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--not-recursive", action="store_true",
                   help="the rules cover only the direct entries of matching directories")
    p.add_argument("--capture", choices=("watch", "mount"),
                   help="how changes are captured (create): a watcher on the root (default), or "
                        "a capture mount at --mount that the application uses (exact write order)")
    p.add_argument("--mount", metavar="MOUNTPOINT",
                   help="with capture mount: where the daemon mounts the root for the application")
    _host_option(p)
    p.set_defaults(run=run_repset)

    p = sub.add_parser("connect", help="connect a replication set to a target: "
                                       "connect REPSET to TARGET map base PATH [nomirror]")
    p.add_argument("words", nargs="+", metavar="WORD")
    _connection_options(p)
    _host_option(p)
    p.set_defaults(run=run_connect)

    p = sub.add_parser("connection-options", help="change the options of a connection "
                                                  "(ignore deletes, orphan policy)")
    p.add_argument("conid", type=int)
    _connection_options(p)
    _host_option(p)
    p.set_defaults(run=run_connection_options)

    p = sub.add_parser("queue-task", help="queue a task command inline in the stream to a target")
    p.add_argument("name", help="the task's name (logs, status, $SMIRROR_TASK_NAME)")
    p.add_argument("--to", required=True, metavar="TARGET", dest="to_target",
                   help="the target daemon HOST:PORT: every connection of this source to it gets the task")
    p.add_argument("--on-queue", metavar="CMD", help="run on the source when queued")
    p.add_argument("--on-transmit", metavar="CMD", help="run on the source just before the task is sent")
    p.add_argument("--on-receive", metavar="CMD", help="run on the target when the task arrives")
    p.add_argument("--on-execute", metavar="CMD", required=True,
                   help="run on the target when every earlier op is applied")
    p.add_argument("--timeout", default="forever", metavar="SECONDS|forever",
                   help="how long applying waits for on-execute (0: not at all; default forever)")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the target's answer (refused or received; default 5)")
    p.add_argument("args", nargs="*", metavar="ARG", help="arguments added to every command")
    _host_option(p)
    p.set_defaults(run=run_queue_task, trailing_args=True)

    p = sub.add_parser("conid", help="find a connection id: conid REPSET to TARGET map base PATH")
    p.add_argument("words", nargs="+", metavar="WORD")
    _host_option(p)
    p.set_defaults(run=run_conid)

    p = sub.add_parser("mirror-start", help="run a mirror of a connection through its stream "
                                            "(checksum differences by default)")
    p.add_argument("conid", type=int)
    p.add_argument("--different", action="store_true",
                   help="only files whose size or mtime differ; alone: sent whole")
    p.add_argument("--checksum", action="store_true",
                   help="(the default) of those, only the blocks whose hashes differ")
    p.add_argument("--full", action="store_true", help="send the whole set")
    p.add_argument("--newer", action="store_true",
                   help="only files whose source mtime is later than the target's (or missing "
                        "there): a newer file on the target is left as it is")
    _host_option(p)
    p.set_defaults(run=run_mirror_start)

    p = sub.add_parser("mirror-stop", help="stop a connection's running mirror (the connection "
                                           "stays and replicates on; the target is not complete "
                                           "until a later mirror-start)")
    p.add_argument("conid", type=int)
    _host_option(p)
    p.set_defaults(run=run_mirror_stop)

    for verb, what in (("pause-target", "stop applying on this target daemon (receiving goes on)"),
                       ("resume-target", "apply again, in order, what was received while paused")):
        p = sub.add_parser(verb, help=what)
        p.add_argument("target", nargs="?", metavar="HOST[:PORT]",
                       help="the target daemon whose applying stops or goes on (required: "
                            "every connection into that daemon is affected)")
        _host_option(p)
        p.set_defaults(run=run_pause, verb_name=verb)

    p = sub.add_parser("disconnect", help="end a connection")
    p.add_argument("conid", type=int)
    _host_option(p)
    p.set_defaults(run=run_disconnect)

    p = sub.add_parser("status", help="connections of a daemon, as a table or JSON")
    _host_option(p)
    p.set_defaults(run=run_status)


def _connection_options(p) -> None:
    p.add_argument("--ignore-deletes", choices=("off", "keep", "move"), default=None,
                   help="do not apply the source's deletes (a move out of the set still deletes); "
                        "keep or move is decided by the target daemon's [target] ignored_deletes, "
                        "not by this value (only smirror replicate obeys 'move')")
    p.add_argument("--keep-deleted-days", type=float, metavar="N", default=None,
                   help="ignored by daemon targets (their [target] deleted_keep_days decides); "
                        "kept for smirror replicate-style engines")
    p.add_argument("--orphans", choices=("report", "delete", "move"), default=None,
                   help="what mirrors do with files only the target has (default report)")
    p.add_argument("--orphans-older-than", type=float, metavar="DAYS", default=None,
                   help="only orphans last modified more than DAYS ago")
    p.add_argument("--sync", choices=("async", "fsync", "every-write"), default=None,
                   help="synchronous mode, for a replication set captured through the mount: "
                        "fsync = an application's fsync there returns once the target made it "
                        "durable; every-write = every changing call does (default async; "
                        "docs/mount.md)")


def _options_of(args) -> dict:
    return {k: v for k, v in {"ignore_deletes": args.ignore_deletes,
                              "deleted_keep_days": args.keep_deleted_days,
                              "orphans": args.orphans,
                              "orphans_older_than_days": args.orphans_older_than,
                              "sync": args.sync}.items()
            if v is not None}


def _config(args):
    from smirror.daemon.config import load
    overrides = {"daemon": {"state_dir": getattr(args, "state_dir", None),
                            "listen": getattr(args, "listen", None),
                            "log_level": getattr(args, "log_level", None)}}
    return load(getattr(args, "config", None), overrides)


def _log_handler(log_file: str):
    """The daemon's log handler: stderr, or ``log_file`` created 0600 (and
    narrowed to 0600 when it exists with wider bits): it names paths and
    keeps task output."""
    import logging

    from smirror.errors import ConfigError
    from smirror.private import PRIVATE_FILE, narrow_file
    if not log_file:
        return logging.StreamHandler()
    try:
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         PRIVATE_FILE))
        narrow_file(log_file)
        return logging.FileHandler(log_file)
    except OSError as exc:
        raise ConfigError(f"daemon.log_file {log_file}: {exc.strerror or exc}") from None


def run_serve(args) -> int:
    import logging

    from smirror.daemon.server import Daemon
    cfg = _config(args)
    handler = _log_handler(cfg.daemon.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("smirror")
    root.addHandler(handler)
    root.setLevel(cfg.daemon.log_level.upper())
    Daemon(cfg).serve_forever()
    return EXIT_OK


def run_user(args) -> int:
    from smirror.daemon.auth import UserStore
    from smirror.errors import ConfigError
    cfg = _config(args)
    store = UserStore(cfg.state_dir / "users.json")
    if args.action == "list":
        for u in store.list():
            print(f"{u.name}\t{u.role}")
        return EXIT_OK
    if not args.name:
        raise ConfigError(f"user {args.action} needs a NAME")
    from smirror.daemon.target_access import SourceBindings, check_source_id
    bindings = SourceBindings(cfg.state_dir)
    if args.action == "remove":
        store.remove(args.name)
        bindings.unbind(args.name)
        return EXIT_OK
    if args.source is not None:
        if args.role != "replication":
            raise ConfigError("--source binds a replication user: use it with --role replication")
        check_source_id(args.source)
        owner = bindings.owner(args.source)
        if owner not in (None, args.name):
            raise ConfigError(f"source {args.source} is bound to user {owner!r} already "
                              f"(remove that user first)")
    store.add(args.name, args.role, _password(args, confirm=True), replace=args.replace)
    if args.role != "replication":
        bindings.unbind(args.name)          # a replaced user speaks for no source any more
    elif args.source is not None:
        bindings.bind(args.name, args.source)
    bound = bindings.bound(args.name)
    print(f"user {args.name} ({args.role}) saved in {store.path}"
          + (f", bound to source {bound}" if bound else ""))
    return EXIT_OK


def _client(args, timeout: float = 30.0):
    from smirror.daemon.control import Client, tls_settings_from_env
    return Client.with_session(args.host, tls=tls_settings_from_env(), timeout=timeout)


def run_login(args) -> int:
    from smirror.daemon.config import parse_hostport
    from smirror.daemon.control import Client, save_session, tls_context, tls_settings_from_env
    from smirror.errors import AuthError
    from smirror.stream import wire
    tls = tls_settings_from_env()
    host, port = parse_hostport(args.address, "daemon address")
    if tls is None and not wire.is_loopback(host):
        raise AuthError(f"refusing to log in to {host}:{port} without TLS: it is not a loopback "
                        "address (set SMIRROR_TLS_CA to the CA of its certificate)")
    with Client(args.address, tls=tls_context(tls)) as c:
        c.login(args.user, _password(args))
        token = c.call("session")["token"]
        save_session(c.address, args.user, token, tls)
        print(f"logged in to {c.address} as {args.user} ({c.user.role})"
              + (" over TLS" if tls else ""))
    return EXIT_OK


def run_logout(args) -> int:
    """Revoke the session on the daemon, then forget it here (also when the
    daemon cannot be reached: the local copy is gone either way)."""
    from smirror.daemon.config import parse_hostport
    from smirror.daemon.control import Client, forget_session, saved_session, tls_settings_from_env
    from smirror.errors import SmirrorError
    host, port = parse_hostport(args.address, "daemon address")
    address = f"{host}:{port}"
    if saved_session(address) is None:
        print(f"not logged in to {address}")
        return EXIT_OK
    revoked, why = False, ""
    try:
        with Client.with_session(address, tls=tls_settings_from_env()) as c:
            revoked = c.call("logout").get("revoked", False)
    except (SmirrorError, OSError) as exc:
        why = str(exc)
    forget_session(address)
    if revoked:
        print(f"logged out of {address}: the session is revoked on the daemon")
        return EXIT_OK
    print("smirror logout: warning: the daemon did not revoke the session"
          + (f" ({why})" if why else "") + "; it is forgotten here", file=sys.stderr)
    return EXIT_OK


def _print(args, result, text) -> None:
    import json
    print(json.dumps(result) if args.json else text)


def run_repset(args) -> int:
    from smirror.errors import ConfigError
    with _client(args) as c:
        if args.action == "list":
            sets = c.call("repset.list")
            lines = [f"{'NAME':<20} {'ROOT':<40} RULES"] + [
                f"{r['name']:<20} {r['root']:<40} "
                + (f"mount at {r['mount']} " if r.get("capture") == "mount" else "")
                + ", ".join(f"{k} {p}{'' if rec else ' (not recursive)'}" for k, p, rec in r["rules"])
                for r in sets]
            _print(args, sets, "\n".join(lines))
            return EXIT_OK
        if not args.name:
            raise ConfigError(f"repset {args.action} needs a NAME")
        if args.action == "delete":
            _print(args, c.call("repset.delete", name=args.name), f"deleted {args.name}")
            return EXIT_OK
        if not args.root:
            raise ConfigError("repset create needs --root DIR")
        rec = not args.not_recursive
        rules = [["include", p, rec] for p in args.include] + [["exclude", p, rec] for p in args.exclude]
        extra = {}
        if args.capture or args.mount:
            extra = {"capture": args.capture or "mount",
                     "mount": os.path.abspath(args.mount) if args.mount else None}
        r = c.call("repset.create", name=args.name, root=os.path.abspath(args.root), rules=rules,
                   **extra)
        _print(args, r, f"created {r['name']} at {r['root']}"
               + (f", captured through the mount at {r['mount']}" if r.get("capture") == "mount" else ""))
    return EXIT_OK


def _parse_connect(words, verb: str):
    """``REPSET to TARGET map base PATH [nomirror]`` (DTCL word order)."""
    from smirror.errors import ConfigError
    # the note writes "PATH, nomirror" and "PATH nomirror": a comma separates
    # options and is never part of a path
    w = []
    for word in words:
        head, comma, tail = word.rpartition(",")
        if comma and tail.lower() in ("", "nomirror"):
            w += [part for part in (head.rstrip(","), tail) if part]
        else:
            w.append(word)
    nomirror = bool(w) and w[-1].lower() == "nomirror"
    if nomirror:
        w = w[:-1]
    if len(w) != 6 or w[1].lower() != "to" or [x.lower() for x in w[3:5]] != ["map", "base"]:
        raise ConfigError(f"usage: smirror {verb} REPSET to TARGET map base PATH"
                          + (" [nomirror]" if verb == "connect" else "") + f"; got {' '.join(words)!r}")
    return w[0], w[2], w[5], nomirror


def run_connect(args) -> int:
    repset, target, base, nomirror = _parse_connect(args.words, "connect")
    with _client(args) as c:
        r = c.call("connect", repset=repset, target=target, map_base=base, nomirror=nomirror,
                   options=_options_of(args))
        _print(args, r, f"connection {r['conid']}: {repset} -> {target} at {base}, accepted by "
                        f"the target" + ("" if nomirror else " (mirror started)"))
    return EXIT_OK


def run_connection_options(args) -> int:
    from smirror.errors import ConfigError
    options = _options_of(args)
    if not options:
        raise ConfigError("connection-options: give at least one of --ignore-deletes, "
                          "--keep-deleted-days, --orphans, --orphans-older-than, --sync")
    with _client(args) as c:
        r = c.call("connection.set", conid=args.conid, options=options)
        _print(args, r, f"connection {r['conid']}: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                                  for k, v in r["options"].items()))
    return EXIT_OK


def run_queue_task(args) -> int:
    from smirror.stream.tasks import parse_timeout
    parse_timeout(args.timeout)             # a bad value fails here, before the daemon
    # on-queue may take a while (a database checkpoint): a long reply timeout
    with _client(args, timeout=3600) as c:
        r = c.call("queue-task", name=args.name, target=args.to_target, on_queue=args.on_queue,
                   on_transmit=args.on_transmit, on_receive=args.on_receive,
                   on_execute=args.on_execute, timeout=args.timeout, args=args.args)
        conns = ", ".join(f"{k} at seq {v}" for k, v in r["connections"].items())
        from smirror.daemon.control import task_answer
        answer = task_answer(c, r, args.wait)
        r = dict(r, target=answer)
        said = {"received": "received by the target",
                "refused": f"target refused: {answer.get('error')}",
                "unknown": f"the target has not received it yet (waited {args.wait:g}s; see status)"}
        _print(args, r, f"task {r['task']} ({r['id']}) queued on connection(s) {conns}; "
                        + said[answer["state"]])
    if answer["state"] == "refused":
        if not args.json:
            print(f"smirror queue-task: error: the target refused task {r['task']}: {answer['error']}",
                  file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_conid(args) -> int:
    repset, target, base, _ = _parse_connect(args.words, "conid")
    with _client(args) as c:
        r = c.call("conid", repset=repset, target=target, map_base=base)
        _print(args, r, str(r["conid"]))
    return EXIT_OK


def run_mirror_start(args) -> int:
    # the reply comes when the mirror's ops are queued: a large set takes a while
    with _client(args) as c:
        r = c.call_waiting(MIRROR_WAIT, "mirror-start", conid=args.conid, full=args.full,
                           different=args.different, checksum=args.checksum, newer=args.newer)
        m = r.get("mirror") or {}
        if m.get("stopped"):
            _print(args, r, f"connection {r['conid']}: mirror STOPPED (mirror-stop) after "
                            f"{m.get('entries_checked', 0)} entries: {m.get('ops', 0)} ops, "
                            f"{m.get('bytes_sent', 0)} bytes queued; the target is not complete")
            return EXIT_OK
        kept = f", {m['kept_newer']} newer on the target left alone" if "kept_newer" in m else ""
        _print(args, r, f"connection {r['conid']}: mirror queued: {m.get('ops', 0)} ops, "
                        f"{m.get('bytes_sent', 0)} bytes of changed blocks, {m.get('orphans', 0)} orphans"
                        + kept)
    return EXIT_OK


MIRROR_WAIT = 24 * 3600.0       # seconds mirror-start waits for its mirror to be queued


def run_mirror_stop(args) -> int:
    with _client(args) as c:
        r = c.call_waiting(120, "mirror-stop", conid=args.conid)      # the daemon answers within 35 s
        from smirror.daemon.control import mirror_stop_text
        _print(args, r, mirror_stop_text(r))
    return EXIT_OK


def run_pause(args) -> int:
    from smirror.errors import ConfigError
    if not args.target:
        # the verb acts on the daemon it talks to, as a target: never on
        # --host (or its default) by surprise
        raise ConfigError(f"{args.verb_name} needs the target daemon: smirror {args.verb_name} "
                          f"HOST[:PORT] ({'stops' if args.verb_name == 'pause-target' else 'resumes'}"
                          f" applying there, for every connection into it; receiving goes on)")
    args.host = args.target
    with _client(args) as c:
        r = c.call(args.verb_name)
        states = ", ".join(f"{k}: {v}" for k, v in r["targets"].items()) or "no connections yet"
        _print(args, r, f"{'paused' if r['paused'] else 'resumed'} ({states})")
    return EXIT_OK


def run_disconnect(args) -> int:
    with _client(args) as c:
        r = c.call("disconnect", conid=args.conid)
        _print(args, r, f"disconnected {r['conid']}"
               + (f"; target: {r['target']}" if r.get("target") else ""))
    return EXIT_OK


def run_status(args) -> int:
    with _client(args) as c:
        st = c.call("status")
    if args.json:
        _print(args, st, "")
        return EXIT_OK
    from smirror.daemon.status_table import status_text
    print(status_text(st))
    return EXIT_OK
