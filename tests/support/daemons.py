"""Daemons as real processes for the integration tests."""
import os
import signal
import socket
import subprocess
import sys
import time

PASSWORD = "admin-password-1"


def package_path():
    """The sys.path entry that holds the smirror under test (a checkout's
    src/ or an installed site-packages), for the PYTHONPATH of the processes
    a test starts, so they run the same code as the test."""
    import smirror
    return os.path.dirname(os.path.dirname(os.path.abspath(smirror.__file__)))


def wait_for(cond, timeout=30.0, what="condition", every=0.05):
    """Poll ``cond()`` until it returns something true (returned) or
    ``timeout`` seconds pass (AssertionError naming ``what``): tests wait for
    conditions, never for fixed times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smirror(*args, env, check=True, input=None):
    proc = subprocess.run([sys.executable, "-m", "smirror", *map(str, args)], env=env,
                          capture_output=True, text=True, input=input, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"smirror {' '.join(map(str, args))}: {proc.returncode}\n{proc.stderr}")
    return proc


class Node:
    """A daemon in TMP/NAME. As a target it accepts map bases under
    ``allowed_roots`` (default: TMP, the test's directory; None: none, it is
    no target). ``state_dir``: where its state lives (default TMP/NAME/state;
    the power-loss tests put it on a LazyFS layer). ``log_level``: the
    daemon's (benchmarks run at "info": debug lines cost on hot paths)."""

    def __init__(self, tmp, name, env, links_user=None, tls_dir=None, extra="", allowed_roots=(),
                 state_dir=None, log_level="debug"):
        self.dir = tmp / name
        self.dir.mkdir()
        self.state_dir = state_dir if state_dir is not None else self.dir / "state"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env
        lines = [f'[daemon]\nlisten = "{self.address}"\nstate_dir = "{self.state_dir}"\n'
                 f'log_file = "{self.dir / "log"}"\nlog_level = "{log_level}"\n',
                 '[reconnect]\nretry_interval = "200ms"\n']
        if links_user:
            pw = self.dir / "link-password"
            pw.write_text(PASSWORD)
            os.chmod(pw, 0o600)
            lines.append(f'[links]\nuser = "{links_user}"\npassword_file = "{pw}"\n')
        if tls_dir is not None:
            lines.append(f'[tls]\nenabled = true\ncert = "{tls_dir / "daemon.pem"}"\n'
                         f'key = "{tls_dir / "daemon.key"}"\nca = "{tls_dir / "ca.pem"}"\n'
                         + _section_body(extra, "tls"))
            extra = _without_section(extra, "tls")
        if allowed_roots == ():
            allowed_roots = [tmp]
        if allowed_roots:
            lines.append("[target]\nallowed_roots = [" + ", ".join(f'"{r}"' for r in allowed_roots)
                         + "]\n" + _section_body(extra, "target"))
            extra = _without_section(extra, "target")
        lines.append(extra)
        self.config = self.dir / "smirror.toml"
        self.config.write_text("".join(lines))
        self.proc = None

    def add_user(self, name, role, password=PASSWORD, source=None, check=True):
        return smirror("user", "add", name, "--role", role, "--password-env", "PW",
                       "--config", self.config, *(("--source", source) if source else ()),
                       env={**self.env, "PW": password}, check=check)

    def daemon_id(self):
        return (self.state_dir / "daemon-id").read_text().strip()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "smirror", "serve", "--config", self.config],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "listening" in line, self.proc.stderr.read() + self.log()
        return self

    def log(self):
        try:
            return (self.dir / "log").read_text()
        except FileNotFoundError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the {self.dir.name} daemon did not end within 30 s of signal "
                                 f"{sig}; its threads:\n{self.stacks()}\nits log:\n"
                                 f"{self.log()[-3000:]}") from None

    def stacks(self) -> str:
        """Every thread's stack of a daemon that hangs (its faulthandler
        prints them to stderr on SIGUSR1), then it is killed."""
        import select
        self.proc.send_signal(signal.SIGUSR1)
        fd, got = self.proc.stderr.fileno(), b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # until the dump has come and stopped (half a second quiet)
            if not select.select([fd], [], [], 0.5)[0]:
                if got:
                    break
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
        self.proc.kill()
        self.proc.wait(30)
        return got.decode(errors="replace")[-20000:]

    def cli(self, *args, check=True, input=None):
        return smirror(*args, "--host", self.address, env=self.env, check=check, input=input)




def _sections(text):
    """TOML text split into (header line or "", body) per section."""
    out, head, body = [], "", []
    for line in text.splitlines(keepends=True):
        if line.strip().startswith("[") and line.strip().endswith("]"):
            out.append((head, "".join(body)))
            head, body = line.strip(), []
        else:
            body.append(line)
    out.append((head, "".join(body)))
    return out


def _section_body(text, name):
    return "".join(body for head, body in _sections(text) if head == f"[{name}]")


def _without_section(text, name):
    return "".join((head + "\n" if head else "") + body
                   for head, body in _sections(text) if head != f"[{name}]")


def make_certs(d):
    """A test CA, a daemon certificate it signed (for 127.0.0.1 and
    localhost) and a self-signed 'rogue' one, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
        "-days", "2", "-subj", "/CN=smirror test CA")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("daemon", "rogue"):
        run("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
            "-subj", "/CN=localhost")
        if name == "daemon":
            run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
                "-days", "2", "-extfile", str(ext))
        else:
            run("x509", "-req", "-in", str(d / f"{name}.csr"), "-signkey", str(d / f"{name}.key"),
                "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(ext))
    return d
