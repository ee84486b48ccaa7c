"""Real ``redis-server`` processes for tests: ACL users, TLS on loopback, AOF, stop and restart.

Security and failure tests need servers configured in ways the shared Redis at
127.0.0.1:6379 is not (a password, TLS, AOF that survives a kill), and servers they may
kill, restart or pause. Each ``RedisServer`` runs in its own temporary directory on a free
loopback port; ``RedisServers`` starts several and stops them all at the end::

    with RedisServers(tmp_path) as servers:
        plain = servers.start(appendonly=True)
        locked = servers.start(password="s3cret")
        secure = servers.start(tls=True)
        plain.kill(); plain.start()        # same port, same AOF: the data is back

Certificates are made here with ``cryptography``: a CA, a server certificate for
``localhost``/``127.0.0.1`` and a client certificate (for mutual TLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlencode

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The ``redis-server`` binary, or ``None`` when it is not installed.
REDIS_SERVER = shutil.which("redis-server")
#: Seconds a server has to answer PING after it was started.
DEFAULT_START_TIMEOUT_S = 10.0
#: The ACL user tests connect as when a password is set.
DEFAULT_USER = "roadstream"
#: Rules of that user: every key and command. Pass narrower rules to test least privilege.
DEFAULT_ACL_RULES = "~* &* +@all"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_supports_tls() -> bool:
    """Whether the installed ``redis-server`` was built with TLS (accepts ``--tls-port``)."""
    if REDIS_SERVER is None:
        return False
    # A TLS build parses the option and then finds nothing to listen on; a build without
    # TLS stops at the unknown directive.
    done = subprocess.run(
        [REDIS_SERVER, "--port", "0", "--tls-port", "0"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    output = done.stdout + done.stderr
    return "not listen anywhere" in output and "Bad directive" not in output


# -- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA and, signed by it, a server and a client certificate, in ``directory``.

    Parameters:
        directory: where the PEM files go (created if missing).

    Returns:
        The paths of the files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(
        "roadstream test CA",
        ca_key,
        None,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(cert_sign=True), True),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    ca_issuer = (ca.subject, ca_key)
    leaf = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(cert_sign=False), True),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_alt = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = _certificate(
        "localhost",
        server_key,
        ca_issuer,
        [*leaf, (server_alt, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "roadstream test client",
        client_key,
        ca_issuer,
        [*leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    for cert, path in ((ca, files.ca_cert), (server, files.server_cert), (client, files.client_cert)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, files.server_key)
    _write_key(client_key, files.client_key)
    return files


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# -- one server ------------------------------------------------------------------------


class RedisServer:
    """One ``redis-server`` process on a loopback port, in its own directory.

    Parameters:
        directory: holds the config, the log, the AOF; created if missing.
        port: the port to listen on (TLS only when ``tls``); a free one by default.
        password: turns the ``default`` user off and adds ``username`` with this password.
        username: the ACL user made when ``password`` is set.
        acl_rules: that user's ACL rules (keys, channels, commands).
        tls: serve TLS only (no plaintext port), with certificates made here.
        tls_auth_clients: with ``tls``, demand a client certificate signed by the test CA.
        appendonly: turn AOF persistence on, fsynced on every write so a SIGKILL loses
            nothing acknowledged.
        acl_file: read users from this ACL file instead of declaring ``username`` in the
            config (``username``/``password`` are then only what clients connect with).
        extra_config: more ``redis.conf`` lines, appended (later lines win).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        username: str = DEFAULT_USER,
        acl_rules: str = DEFAULT_ACL_RULES,
        tls: bool = False,
        tls_auth_clients: bool = False,
        appendonly: bool = False,
        acl_file: Path | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        if REDIS_SERVER is None:
            message = "redis-server is not installed"
            raise RuntimeError(message)
        if password is not None and (not password or any(c.isspace() for c in password)):
            message = "an ACL password in redis.conf must be non-empty and hold no whitespace"
            raise ValueError(message)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.username = username if password is not None else None
        self.acl_rules = acl_rules
        self.tls_files = make_tls_files(self.directory / "tls") if tls else None
        self.tls_auth_clients = tls_auth_clients
        self.appendonly = appendonly
        self.acl_file = acl_file
        self.extra_config = list(extra_config)
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The server's config file."""
        return self.directory / "redis.conf"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def url(
        self,
        db: int = 0,
        *,
        scheme: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca: bool = True,
        client_cert: bool | None = None,
    ) -> str:
        """A URL that reaches this server, with credentials and TLS files as it needs.

        Parameters:
            db: database number.
            scheme: ``redis`` or ``rediss``; the server's own by default.
            username: override the ACL user (``""``: none).
            password: override the password (``""``: none).
            ca: add ``ssl_ca_certs`` (the test CA) to a ``rediss`` URL.
            client_cert: add the client certificate; by default when the server demands one.

        Returns:
            A ``redis://`` or ``rediss://`` URL for ``redis.from_url`` (TLS files travel as
            query arguments, which redis-py passes to its connection).
        """
        scheme = scheme or ("rediss" if self.tls_files else "redis")
        user = self.username if username is None else username
        secret = self.password if password is None else password
        auth = ""
        if secret:
            auth = f"{quote(user or '', safe='')}:{quote(secret, safe='')}@"
        query: dict[str, str] = {}
        if scheme == "rediss" and self.tls_files:
            if ca:
                query["ssl_ca_certs"] = str(self.tls_files.ca_cert)
            if self.tls_auth_clients if client_cert is None else client_cert:
                query["ssl_certfile"] = str(self.tls_files.client_cert)
                query["ssl_keyfile"] = str(self.tls_files.client_key)
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}{suffix}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client as the configured user (for checks and setup)."""
        return redis.Redis.from_url(self.url(db), **kwargs)

    # -- lifecycle ---------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"logfile {self.log_path}",
            "daemonize no",
            'save ""',  # AOF or nothing: no background RDB snapshots during tests
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync always",
        ]
        if self.tls_files:
            files = self.tls_files
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {files.server_cert}",
                f"tls-key-file {files.server_key}",
                f"tls-ca-cert-file {files.ca_cert}",
                f"tls-auth-clients {'yes' if self.tls_auth_clients else 'no'}",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.acl_file is not None:
            lines.append(f"aclfile {self.acl_file}")
        elif self.password is not None:
            lines += ["user default off", f"user {self.username} on >{self.password} {self.acl_rules}"]
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused one counts)."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self.process.pid if self.running else None

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> RedisServer:
        """Start the server (again: same port, same directory, so AOF data comes back).

        Raises:
            RuntimeError: it exited or did not answer PING in time; the message holds
                the end of its log.
        """
        if self.running:
            return self
        self.config_path.write_text(self._config())
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_until_ready(timeout_s)
        return self

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                with self.client(socket_timeout=1, socket_connect_timeout=1) as client:
                    if client.ping():
                        return
            except redis.RedisError as exc:
                last_error = exc
                # LOADING (AOF replay) and refused connections both mean "not yet".
            time.sleep(0.02)
        tail = "" if self.running else self.log_tail()  # read its stderr before closing it
        self._terminate(signal.SIGKILL)
        message = f"redis-server on port {self.port} did not start ({last_error}):\n{tail or self.log_tail()}"
        raise RuntimeError(message)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        stderr = ""
        process = self.process
        if (
            process is not None
            and process.poll() is not None
            and process.stderr
            and not process.stderr.closed
        ):
            stderr = process.stderr.read().decode(errors="replace")
        return "\n".join((log + stderr).splitlines()[-lines:])

    def _terminate(self, sig: signal.Signals, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.resume()  # a stopped process cannot act on SIGTERM
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: Redis flushes the AOF and exits)."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, crash: bool = False, down_s: float = 0.0) -> RedisServer:
        """Stop (or kill, with ``crash``), stay down ``down_s`` seconds, start again."""
        self.kill() if crash else self.stop()
        time.sleep(down_s)
        return self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open, nothing is answered."""
        if self.running:
            self.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self) -> None:
        """Let a paused process go on (SIGCONT)."""
        if self.running:
            self.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class RedisServers:
    """Starts servers in subdirectories of one folder and stops every one at the end.

    Parameters:
        directory: the parent folder (a test's ``tmp_path``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.servers: list[RedisServer] = []

    def start(self, *, attempts: int = 3, **options: Any) -> RedisServer:
        """Start one server; ``options`` are ``RedisServer``'s keyword arguments.

        Another process may take the free port between choosing and binding it, so a
        server without a fixed port is retried on a fresh one.
        """
        for attempt in range(attempts):
            server = RedisServer(self.directory / f"redis-{len(self.servers)}", **options)
            self.servers.append(server)
            try:
                return server.start()
            except RuntimeError:
                if "port" in options or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Kill every server this pool started."""
        for server in self.servers:
            server.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Redis Cluster -----------------------------------------------------------------------

#: The ``redis-cli`` binary (``redis-cli --cluster create`` builds a cluster).
REDIS_CLI = shutil.which("redis-cli")
#: How long a cluster node may be unreachable before its replica takes over: short, so a
#: failover test waits seconds, not the default 15.
CLUSTER_NODE_TIMEOUT_MS = 1000


def cluster_config(node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS) -> list[str]:
    """``redis.conf`` lines of a cluster node for tests."""
    return [
        "cluster-enabled yes",
        "cluster-config-file nodes.conf",
        f"cluster-node-timeout {node_timeout_ms}",
        # Serve the slots that have a primary while another primary's failover runs.
        "cluster-require-full-coverage no",
        # A replica may take over however long its link was down (tests kill at will).
        "cluster-replica-validity-factor 0",
    ]


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, its bus port (+10000) free too."""
    rng = random.Random()
    while True:
        port = rng.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


class RedisClusterServers:
    """A local Redis Cluster: ``masters`` primaries, each with ``replicas`` replicas.

    Every node is a ``RedisServer`` (loopback, free port, own directory); ``start`` joins
    them with ``redis-cli --cluster create`` and waits until every node sees the cluster
    ``ok`` with all slots assigned::

        with RedisClusterServers(tmp_path) as cluster:
            url = cluster.start().url()          # redis+cluster://127.0.0.1:PORT
            cluster.kill_primary_of(b"rs:jobs")  # its replica takes over

    Parameters:
        directory: parent folder of the nodes' directories.
        masters: primaries (the slots are split evenly).
        replicas: replicas of each primary.
        options: more ``RedisServer`` options for every node (``appendonly`` …).
    """

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1, **options: Any) -> None:
        self.directory = Path(directory)
        self.masters = masters
        self.replicas = replicas
        self.options = options
        self.servers = RedisServers(self.directory)
        self.nodes: list[RedisServer] = []

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the nodes, create the cluster, wait until it serves every slot.

        Raises:
            RuntimeError: ``redis-cli`` is missing, ``--cluster create`` failed, or the
                cluster was not ``ok`` in time.
        """
        if REDIS_CLI is None:
            message = "redis-cli is not installed (it creates the cluster)"
            raise RuntimeError(message)
        count = self.masters * (1 + self.replicas)
        self.nodes = [self._start_node() for _ in range(count)]
        first = self.nodes[0]
        auth = ["--user", first.username or "", "--pass", first.password] if first.password else []
        command = [REDIS_CLI, *auth, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            message = f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}"
            raise RuntimeError(message)
        self.wait_ok(timeout_s)
        return self

    def _start_node(self, attempts: int = 5) -> RedisServer:
        extra = [*cluster_config(), *self.options.get("extra_config", ())]
        options = {k: v for k, v in self.options.items() if k != "extra_config"}
        for attempt in range(attempts):
            try:
                return self.servers.start(port=free_cluster_port(), extra_config=extra, **options)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def url(self, scheme: str = "redis+cluster") -> str:
        """A cluster URL through the first live node."""
        node = next(n for n in self.nodes if n.running)
        return node.url(0, scheme="redis").replace("redis://", f"{scheme}://", 1)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A synchronous cluster client (for checks and setup)."""
        node = next(n for n in self.nodes if n.running)
        return redis.RedisCluster(host="127.0.0.1", port=node.port, require_full_coverage=False,
                                  username=node.username, password=node.password, **kwargs)  # fmt: skip

    def wait_ok(self, timeout_s: float = 60.0, *, masters: int | None = None, replicas: int | None = None) -> None:
        """Until every live node says ``cluster_state:ok`` with all 16384 slots served,
        ``masters`` primaries serve them and each has ``replicas`` replicas in sync (the
        configured counts by default)."""
        deadline = time.monotonic() + timeout_s
        want = self.masters if masters is None else masters
        want_replicas = self.replicas if replicas is None else replicas
        while True:
            states = [self._info(n) for n in self.nodes if n.running]
            primaries = self.primaries()
            if (
                all(s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384" for s in states)
                and len(primaries) == want
                and all(self._replicas_in_sync(p) >= want_replicas for p in primaries)
                # Clients learn replicas from CLUSTER SLOTS, which lists them only once
                # gossip has told that node: "in sync" on the primary comes first.
                and all(self._slot_replicas(n) >= want_replicas for n in self.nodes if n.running)
            ):
                return
            if time.monotonic() > deadline:
                message = f"cluster not ok after {timeout_s} s: {states}"
                raise RuntimeError(message)
            time.sleep(0.1)

    @staticmethod
    def _ask(node: RedisServer, *command: str):
        """``command``'s reply from ``node``, or ``None`` while it does not answer."""
        try:
            with node.client(socket_timeout=1, socket_connect_timeout=1) as client:
                return client.execute_command(*command)
        except redis.RedisError:
            return None

    @classmethod
    def _replicas_in_sync(cls, node: RedisServer) -> int:
        info = cls._ask(node, "INFO", "replication") or {}
        return sum(
            1 for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
        )

    @classmethod
    def _slot_replicas(cls, node: RedisServer) -> int:
        """The fewest replicas ``node``'s CLUSTER SLOTS lists for a slot range."""
        ranges = cls._ask(node, "CLUSTER", "SLOTS") or []
        return min((len(r) - 3 for r in ranges), default=0)

    @staticmethod
    def _info(node: RedisServer) -> dict[str, str]:
        try:
            with node.client(socket_timeout=1, socket_connect_timeout=1) as client:
                return {k: str(v) for k, v in client.execute_command("CLUSTER INFO").items()}
        except redis.RedisError:
            return {}

    def primaries(self) -> list[RedisServer]:
        """The live nodes that are primaries serving slots now (each by its own word)."""
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with node.client(socket_timeout=1, socket_connect_timeout=1) as client:
                    view = client.execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            mine = next((v for v in view.values() if "myself" in v["flags"]), None)
            if mine and "master" in mine["flags"] and mine["slots"]:
                found.append(node)
        return found

    def primary_of(self, key: bytes | str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        with self.client() as client:
            node = client.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == node.port)

    def flush(self) -> None:
        """Empty every primary (the replicas follow)."""
        with self.client() as client:
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)

    def close(self) -> None:
        """Kill every node."""
        self.servers.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sync_client(url: str, **kwargs: Any) -> redis.Redis | redis.RedisCluster:
    """A synchronous client for a test URL: a ``RedisCluster`` for ``redis+cluster://``."""
    scheme, sep, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        return redis.RedisCluster.from_url(f"{scheme.removesuffix('+cluster')}{sep}{rest}", require_full_coverage=False, **kwargs)
    return redis.Redis.from_url(url, **kwargs)
