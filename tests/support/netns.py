"""A smirror daemon run inside a network namespace (the network-fault
harnesses: tests/support/faults.py ``run_net`` and tests/support/netfaults.py)."""
from __future__ import annotations

import subprocess
import sys

from smirror.daemon.control import Client
from smirror.errors import SmirrorError
from support.daemons import PASSWORD, Node
from support.netem import in_netns


class NetnsDaemon(Node):
    """A daemon in network namespace NS, listening on every address there:
    its peer reaches it at ``data_address`` (over the faulty link), its CLI
    runs in NS too and reaches it on loopback (no TLS needed for a session
    there)."""

    def __init__(self, tmp, name, env, ns, host, **kw):
        super().__init__(tmp, name, env, **kw)
        self.ns = ns
        self.data_address = f"{host}:{self.port}"
        # a test link with no one else on it: plain TCP, said so in the config
        self.config.write_text(self.config.read_text().replace(
            f'listen = "{self.address}"', f'listen = "0.0.0.0:{self.port}"\ninsecure = true'))

    def start(self):
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "smirror",
                                      "serve", "--config", self.config],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"daemon in {self.ns} did not start: {self.proc.stderr.read()}{self.log()}")
        return self

    def cli(self, *args, check=True, input=None):
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "smirror", *map(str, args),
               "--host", self.address]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, input=input, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"smirror {' '.join(map(str, args))} ({self.ns}): "
                                 f"{proc.returncode}\n{proc.stderr}")
        return proc

    def login(self, user="admin"):
        proc = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m", "smirror", "login",
                               self.address, "--user", user, "--password-env", "PW"],
                              env={**self.env, "PW": PASSWORD}, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"login to {self.address}: {proc.stderr}")

    _client = None

    def status(self) -> dict:
        """The daemon's status, through a control link kept open (made in
        its namespace): polling it costs no process start."""
        for attempt in (1, 2):
            try:
                if self._client is None:
                    with in_netns(self.ns):
                        self._client = Client(self.address, timeout=30).login("admin", PASSWORD)
                return self._client.call("status")
            except (OSError, SmirrorError):
                if self._client is not None:
                    self._client.link.close()
                    self._client = None
                if attempt == 2:
                    raise
