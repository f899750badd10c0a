"""Broker security for the secure profile: a local CA, certificates, users, ACLs, a secure Mosquitto.

``SecurityDir`` keeps everything in one directory (created 0700; keys and
secrets 0600):

- ``ca.crt``/``ca.key``: a local certificate authority, ``broker.crt``/``.key``:
  the broker's certificate (subject alternative names ``localhost`` and
  ``127.0.0.1`` unless told otherwise), ``clients/{name}.crt``/``.key``: client
  certificates whose common name (CN) is the user name. Made with the
  ``openssl`` CLI (no extra Python dependency).
- ``passwd``: Mosquitto's password file. Hashes are written in Python in
  ``mosquitto_passwd``'s own format (``$7$``: PBKDF2-SHA512, 101 iterations,
  12-byte salt), so no password ever appears on a command line.
- ``acl``: the ACL file. A device logs in with its device id as user name
  (password, or the CN of its client certificate) and may publish only
  ``{base}/devices/{id}/telemetry|state|ack`` and read only
  ``{base}/devices/{id}/cmd``: ``%u`` patterns, so adding a device never
  touches the ACL. ``%c`` (the client id) grants nothing: a client picks its
  own id, so it is no identity. The service users ``flow``, ``bridge`` and
  ``orchestrator`` get the topics they need (``service_users``); a gateway
  gets its status topic and the topics of the devices behind it.
- ``credentials.json``: the passwords this directory generated (0600), so
  the local profile can build URLs. Keep it out of version control.

``SecureMosquitto`` runs Mosquitto with ``mosquitto-secure.conf`` on free
loopback ports: a TLS listener (user name + password), a mutual-TLS listener
(client certificate, CN = user name) and, for the local demo profile only, a
plaintext listener on 127.0.0.1 that still requires a password and the ACL.
Persistence is on (retained states and queued QoS 1 messages survive a
restart). ``reload()`` makes a running broker re-read users and ACLs (SIGHUP).

Example::

    sec = SecurityDir.init(path, base="iotflow")
    sec.add_device("pump-7")                      # a random password, kept in credentials.json
    sec.add_device("valve-3", password=False, cert=True)  # client certificate only
    with SecureMosquitto(sec).start() as broker:
        url = broker.url("pump-7")                 # mqtts://pump-7:***@localhost:PORT
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import quote

from iotflow.errors import ConfigError, StackError
from iotflow.topics import MqttTopics, check_device_id

__all__ = [
    "SERVICE_USERS",
    "AclUser",
    "CertPair",
    "CertificateAuthority",
    "SecureMosquitto",
    "SecurityDir",
    "gateway_user",
    "hash_password",
    "render_acl",
    "render_secure_conf",
    "service_users",
]

SERVICE_USERS = ("flow", "bridge", "orchestrator")
_CONF_TEMPLATE = Path(__file__).with_name("mosquitto-secure.conf")
_DAYS = 825  # the longest validity Apple and browsers accept for a leaf certificate
_ACCESS = ("read", "write", "readwrite")


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise StackError("openssl is not installed (apt-get install openssl)") from exc
    except subprocess.CalledProcessError as exc:
        msg = f"openssl {args[0]} failed: {exc.stderr.strip()[-500:]}"
        raise StackError(msg) from exc


def _subject(common_name: str) -> str:
    escaped = "".join(f"\\{ch}" if ch in '\\/=+,"<>;#' else ch for ch in common_name)
    return f"/CN={escaped}"


def _new_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


class CertificateAuthority:
    """A local CA that signs the broker's and the clients' certificates (EC P-256, SHA-256)."""

    def __init__(self, pair: CertPair) -> None:
        self.pair = pair

    @property
    def cert(self) -> Path:
        return self.pair.cert

    @classmethod
    def create(cls, directory: Path, common_name: str = "iotflow local CA") -> Self:
        directory.mkdir(parents=True, exist_ok=True)
        pair = CertPair(directory / "ca.crt", directory / "ca.key")
        _new_key(pair.key)
        _openssl(
            "req", "-x509", "-new", "-utf8", "-key", str(pair.key), "-out", str(pair.cert),
            "-days", str(_DAYS), "-sha256", "-subj", _subject(common_name),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return cls(pair)

    def issue(
        self, directory: Path, name: str, common_name: str, *, server_hosts: Sequence[str] = ()
    ) -> CertPair:
        """Sign a new key for ``common_name``: a server certificate when ``server_hosts``
        (DNS names and IP addresses for its subject alternative names) is given, else a
        client certificate."""
        directory.mkdir(parents=True, exist_ok=True)
        pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
        csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
        _new_key(pair.key)
        _openssl(
            "req", "-new", "-utf8", "-key", str(pair.key), "-out", str(csr),
            "-subj", _subject(common_name),
        )  # fmt: skip
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
        if server_hosts:
            sans = ",".join(f"{'IP' if _is_ip(h) else 'DNS'}:{h}" for h in server_hosts)
            lines += [f"subjectAltName={sans}", "extendedKeyUsage=serverAuth"]
        else:
            lines.append("extendedKeyUsage=clientAuth")
        ext.write_text("\n".join(lines) + "\n")
        try:
            _openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(self.pair.cert),
                "-CAkey", str(self.pair.key), "-out", str(pair.cert), "-days", str(_DAYS),
                "-sha256", "-set_serial", str(secrets.randbits(63)), "-extfile", str(ext),
            )  # fmt: skip
        finally:
            csr.unlink(missing_ok=True)
            ext.unlink(missing_ok=True)
        return pair


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- passwords


def hash_password(password: str, *, iterations: int = 101, salt: bytes | None = None) -> str:
    """A Mosquitto password-file hash (``$7$``: PBKDF2-SHA512), as ``mosquitto_passwd`` writes.

    Example::

        >>> h = hash_password("pw", salt=bytes(12))
        >>> h.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(h.split("$")[4])
        88
    """
    if not password:
        raise ConfigError("an empty password would let anyone who knows the user name in")
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _check_user_name(name: str) -> str:
    why = check_device_id(name)
    if why is None and ":" in name:
        why = f"user name {name!r} contains ':' (the password file's separator)"
    if why is not None:
        raise ConfigError(f"{why}; a user name must be usable as an MQTT topic level")
    return name


# --------------------------------------------------------------------------- ACLs


@dataclass(frozen=True)
class AclUser:
    """A user's grants in the ACL file: topic filters it may read (subscribe) and write."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"user {self.name}"]
        for topic in dict.fromkeys((*self.read, *self.write)):
            access = {
                (True, True): "readwrite",
                (True, False): "read",
                (False, True): "write",
            }[(topic in self.read, topic in self.write)]
            out.append(f"topic {access} {topic}")
        return out


def service_users(base: str = "iotflow") -> tuple[AclUser, ...]:
    """The iotflow services' grants.

    - ``flow``: reads every device's telemetry and state; publishes and reads
      ``{base}/flows/+/status`` (each MQTT source worker's online/offline).
    - ``bridge``: reads telemetry, state and acks; its own ``{base}/bridges/+/status``.
    - ``orchestrator``: writes ``{base}/devices/+/cmd``; reads acks, states and
      gateway status; publishes its MQTT sources' flow status.
    """
    t = MqttTopics(base)
    flows, bridges = f"{base}/flows/+/status", f"{base}/bridges/+/status"
    return (
        AclUser("flow", read=(t.telemetry(), t.state(), flows), write=(flows,)),
        AclUser("bridge", read=(t.telemetry(), t.state(), t.ack(), bridges), write=(bridges,)),
        AclUser(
            "orchestrator",
            read=(t.ack(), t.state(), t.gateway_status(), flows),
            write=(t.cmd(), flows),
        ),
    )


def gateway_user(base: str, gateway_id: str, devices: Iterable[str] = ()) -> AclUser:
    """A gateway: its retained status (and last will), plus, for each device behind it,
    what that device itself may do (publish telemetry, state, ack; read cmd)."""
    t = MqttTopics(base)
    devices = [_check_user_name(d) for d in devices]
    status = t.gateway_status(_check_user_name(gateway_id))
    write = [status]
    for d in devices:
        write += [t.telemetry(d), t.state(d), t.ack(d)]
    return AclUser(gateway_id, read=(status, *(t.cmd(d) for d in devices)), write=tuple(write))


def render_acl(base: str, users: Iterable[AclUser]) -> str:
    """The ACL file: device patterns on ``%u`` for everyone, then each user's own topics.

    Example::

        >>> print(render_acl("iotflow", []).splitlines()[-1])
        pattern read iotflow/devices/%u/cmd
    """
    t = MqttTopics(base)
    _check_user_name(base)
    out = [
        f"# Generated by infra.security for MQTT base {base!r}; regenerate, do not edit.",
        "# Devices: the user name is the device id (password file, or the CN of the client",
        "# certificate). A device publishes only its own telemetry, state and ack and reads",
        "# only its own cmd topic. The client id (%c) grants nothing: a client chooses it.",
        f"pattern write {t.telemetry('%u')}",
        f"pattern write {t.state('%u')}",
        f"pattern write {t.ack('%u')}",
        f"pattern read {t.cmd('%u')}",
    ]
    for user in users:
        _check_user_name(user.name)
        for topic in (*user.read, *user.write):
            if not topic or any(ch in topic for ch in "\n\r\0"):
                raise ConfigError(
                    f"ACL topic {topic!r} of user {user.name!r} is not a topic filter"
                )
        out += ["", *user.lines()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the directory


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


@dataclass
class _State:
    base: str
    hosts: list[str]
    grants: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    cert_users: list[str] = field(default_factory=list)


class SecurityDir:
    """Everything the secure broker and its clients need, kept in one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state_file = path / "security.json"
        if not state_file.exists():
            msg = f"{path} is not a security directory (no security.json); create one with SecurityDir.init"
            raise ConfigError(msg)
        self._state = _State(**json.loads(state_file.read_text()))

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        base: str = "iotflow",
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        services: Iterable[str] = SERVICE_USERS,
    ) -> Self:
        """Create the CA, the broker certificate and the service users (random passwords).

        An existing security directory is opened as it is, never overwritten.
        """
        if (path / "security.json").exists():
            return cls(path)
        _check_user_name(base)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        ca = CertificateAuthority.create(path)
        ca.issue(path, "broker", hosts[0] if hosts else "localhost", server_hosts=hosts)
        _write_private(path / "credentials.json", "{}")
        (path / "security.json").write_text(json.dumps(_State(base, list(hosts)).__dict__))
        sec = cls(path)
        wanted = set(services)
        for user in service_users(base):
            if user.name in wanted:
                sec.add_service(user)
        sec.write_broker_files()
        return sec

    # -- what is in it

    @property
    def base(self) -> str:
        return self._state.base

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    @property
    def server(self) -> CertPair:
        return CertPair(self.path / "broker.crt", self.path / "broker.key")

    @property
    def password_file(self) -> Path:
        return self.path / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.path / "acl"

    def _credentials(self) -> dict[str, str]:
        return json.loads((self.path / "credentials.json").read_text())

    def users(self) -> list[str]:
        """The user names with a password, sorted."""
        return sorted(self._credentials())

    def password(self, user: str) -> str:
        """The password this directory keeps for ``user``; never log it."""
        creds = self._credentials()
        if user not in creds:
            msg = f"no password for user {user!r} in {self.path}; known users: {sorted(creds)}"
            raise ConfigError(msg)
        return creds[user]

    def client_cert(self, name: str) -> CertPair:
        pair = CertPair(
            self.path / "clients" / f"{name}.crt", self.path / "clients" / f"{name}.key"
        )
        if not pair.cert.exists():
            raise ConfigError(f"no client certificate for {name!r} in {self.path / 'clients'}")
        return pair

    # -- changing it (call write_broker_files, then SecureMosquitto.reload, to apply)

    def add_user(self, name: str, password: str | None = None) -> str:
        """Add or replace a password user; returns the password (random when None)."""
        _check_user_name(name)
        password = secrets.token_urlsafe(24) if password is None else password
        if not password:
            raise ConfigError(
                f"an empty password for {name!r} would let anyone with the user name in"
            )
        creds = self._credentials()
        creds[name] = password
        _write_private(self.path / "credentials.json", json.dumps(creds, indent=2))
        return password

    def add_device(
        self, device_id: str, *, password: bool | str = True, cert: bool = False
    ) -> CertPair | None:
        """A device: a password user (``True``: a random password, a string: that one,
        ``False``: none) and/or a client certificate with CN = device id (``cert=True``)."""
        if password is not False:
            self.add_user(device_id, None if password is True else password)
        return self.issue_client_cert(device_id) if cert else None

    def add_gateway(
        self, gateway_id: str, devices: Iterable[str] = (), password: str | None = None
    ) -> str:
        """A gateway user with its status topic and the topics of ``devices``; returns its password."""
        return self.add_service(gateway_user(self.base, gateway_id, devices), password)

    def add_service(self, user: AclUser, password: str | None = None) -> str:
        """A user with its own ACL grants (replacing earlier ones); returns its password."""
        render_acl(self.base, [user])  # validates the name and the topics
        self._state.grants[user.name] = {"read": list(user.read), "write": list(user.write)}
        self._save_state()
        return self.add_user(user.name, password)

    def issue_client_cert(self, name: str) -> CertPair:
        """A client certificate whose CN is ``name`` (the user name on the mutual-TLS listener)."""
        _check_user_name(name)
        pair = CertificateAuthority(CertPair(self.ca_file, self.path / "ca.key")).issue(
            self.path / "clients", name, name
        )
        if name not in self._state.cert_users:
            self._state.cert_users.append(name)
            self._save_state()
        return pair

    def _save_state(self) -> None:
        (self.path / "security.json").write_text(json.dumps(self._state.__dict__, indent=2))

    def acl_users(self) -> list[AclUser]:
        """The users with grants of their own (services, gateways), in the order added."""
        return [
            AclUser(name, tuple(g["read"]), tuple(g["write"]))
            for name, g in self._state.grants.items()
        ]

    def write_broker_files(self) -> None:
        """Write ``passwd`` and ``acl`` from the users and grants recorded here.

        Lines of ``passwd`` for users this directory does not know (added with
        ``mosquitto_passwd``) are kept as they are.
        """
        creds = self._credentials()
        kept = []
        if self.password_file.exists():
            for line in self.password_file.read_text().splitlines():
                name = line.split(":", 1)[0]
                if line.strip() and name not in creds:
                    kept.append(line)
        lines = [*kept, *(f"{u}:{hash_password(p)}" for u, p in sorted(creds.items()))]
        _write_private(self.password_file, "\n".join(lines) + "\n")
        _write_private(self.acl_file, render_acl(self.base, self.acl_users()))


# --------------------------------------------------------------------------- the broker


def render_secure_conf(
    sec: SecurityDir,
    *,
    tls_port: int,
    mtls_port: int,
    plain_port: int | None = None,
    bind: str = "127.0.0.1",
    data_dir: Path | None = None,
) -> str:
    """``mosquitto-secure.conf`` filled in for ``sec``; a plaintext listener only when
    ``plain_port`` is given, and then on 127.0.0.1 whatever ``bind`` says."""
    data_dir = data_dir or sec.path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    plain = (
        f"# local profile only: loopback, password and ACL still required\nlistener {plain_port} 127.0.0.1"
        if plain_port is not None
        else "# no plaintext listener"
    )
    return _CONF_TEMPLATE.read_text().format(
        password_file=sec.password_file,
        acl_file=sec.acl_file,
        run_as=pwd.getpwuid(os.geteuid()).pw_name,
        data_dir=data_dir,
        tls_port=tls_port,
        mtls_port=mtls_port,
        bind=bind,
        ca_file=sec.ca_file,
        cert_file=sec.server.cert,
        key_file=sec.server.key,
        plain_listener=plain,
    )


class SecureMosquitto:
    """Mosquitto in the secure profile on free loopback ports, started and stopped by us.

    ``tls_port``: TLS with user name + password; ``mtls_port``: client
    certificate required, CN = user name; ``plain_port`` (only with
    ``plain_listener=True``, the local demo profile): 127.0.0.1, password and
    ACL still required. Use as a context manager::

        with SecureMosquitto(sec).start() as broker:
            broker.url("flow")
    """

    def __init__(
        self,
        sec: SecurityDir,
        *,
        plain_listener: bool = False,
        host: str = "localhost",
        data_dir: Path | None = None,
    ) -> None:
        self.sec = sec
        self.host = host
        self.data_dir = data_dir or sec.path / "data"
        self._plain = plain_listener
        self.proc: subprocess.Popen | None = None
        self.tls_port = self.mtls_port = 0
        self.plain_port: int | None = None

    def start(self, attempts: int = 3) -> Self:
        """Write the broker files and start Mosquitto; raise StackError when it cannot start."""
        from infra.stack import _spawn, _stop, find_mosquitto, free_port, wait_for_port

        binary = find_mosquitto()
        if binary is None:
            raise StackError("the secure profile needs Mosquitto (apt-get install mosquitto)")
        self.sec.write_broker_files()
        last: StackError | None = None
        for _ in range(attempts):
            ports = [free_port() for _ in range(3)]
            self.tls_port, self.mtls_port = ports[0], ports[1]
            self.plain_port = ports[2] if self._plain else None
            conf = self.sec.path / f"mosquitto-{self.tls_port}.conf"
            conf.write_text(
                render_secure_conf(
                    self.sec,
                    tls_port=self.tls_port,
                    mtls_port=self.mtls_port,
                    plain_port=self.plain_port,
                    data_dir=self.data_dir,
                )
            )
            proc = _spawn([binary, "-c", str(conf)], self.sec.path / "mosquitto.out")
            try:
                for port in (self.tls_port, self.mtls_port, self.plain_port):
                    if port is not None:
                        wait_for_port(port, 10, proc)
                self.proc = proc
                return self
            except StackError as exc:  # a port was taken between free_port() and bind
                last = exc
                _stop(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        raise StackError(
            f"secure mosquitto did not start: {last} (see {self.sec.path / 'mosquitto.out'})"
        )

    def reload(self) -> None:
        """Rewrite ``passwd`` and ``acl`` and make the running broker re-read them (SIGHUP)."""
        self.sec.write_broker_files()
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGHUP)

    def url(self, user: str | None, *, password: str | None = None, listener: str = "tls") -> str:
        """A URL for ``user`` (its stored password unless given) on ``listener``:
        ``tls`` (mqtts, password), ``mtls`` (mqtts, no password: the certificate) or
        ``plain`` (mqtt on 127.0.0.1). The URL holds the password: never log it."""
        port = {"tls": self.tls_port, "mtls": self.mtls_port, "plain": self.plain_port}.get(
            listener
        )
        if port is None:
            raise ConfigError(f"listener {listener!r} is not running; choose tls, mtls or plain")
        scheme, host = ("mqtt", "127.0.0.1") if listener == "plain" else ("mqtts", self.host)
        if user is None:
            return f"{scheme}://{host}:{port}"
        if listener == "mtls":
            return f"{scheme}://{quote(user, safe='')}@{host}:{port}"
        secret = self.sec.password(user) if password is None else password
        return f"{scheme}://{quote(user, safe='')}:{quote(secret, safe='')}@{host}:{port}"

    def stop(self) -> None:
        """Stop the broker (it saves its persistence file on the way out)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infra.security DIR init|device|gateway|cert ...``: manage a security directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.security", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="the security directory")
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser(
        "init", help="CA, broker certificate, service users (flow, bridge, orchestrator)"
    )
    init.add_argument("--base", default="iotflow")
    init.add_argument("--host", action="append", help="broker DNS name or IP (repeatable)")
    dev = sub.add_parser("device", help="add a device (user name = device id)")
    dev.add_argument("device_id")
    dev.add_argument("--cert", action="store_true", help="issue a client certificate (CN = id)")
    dev.add_argument("--no-password", action="store_true", help="certificate login only")
    gw = sub.add_parser("gateway", help="add a gateway and the devices behind it")
    gw.add_argument("gateway_id")
    gw.add_argument("--device", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        if args.action == "init":
            sec = SecurityDir.init(
                args.dir, base=args.base, hosts=args.host or ("localhost", "127.0.0.1")
            )
            print(
                f"security directory {args.dir}: CA {sec.ca_file}, users {', '.join(sec.users())}"
            )
            return 0
        sec = SecurityDir(args.dir)
        if args.action == "device":
            pair = sec.add_device(args.device_id, password=not args.no_password, cert=args.cert)
            if pair is not None:
                print(f"client certificate {pair.cert}, key {pair.key}")
        else:
            sec.add_gateway(args.gateway_id, args.device)
        sec.write_broker_files()
        where = sec.path / "credentials.json"
        print(f"updated {sec.password_file} and {sec.acl_file}; passwords are in {where}; "
              "send SIGHUP to a running mosquitto to apply")  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
