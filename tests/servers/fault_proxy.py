"""A fault-injecting HTTP/1.1 proxy for S3-style endpoints (stdlib only).

The proxy sits between a client (boto3, s3fs, MSC, ...) and a real server (moto). For every request it
either forwards it unchanged or, with probability ``rate`` (seeded RNG), injects one fault:

* ``503``            answer ``503 SlowDown`` (S3 XML error body) without forwarding; the connection stays open.
* ``drop_request``   read half of the request body, then reset the client connection (the request never
                     reaches the server).
* ``drop_response``  forward the request (the server applies it), then send the first half of the response
                     bytes (status line + headers + body) and reset the connection. For a GET with a body
                     the cut usually falls inside the body: boto3 then raises ``ResponseStreamingError``
                     from ``Body.read()`` (botocore does not retry that itself); s3fs retries it.

Control endpoints (never faulted), served on the proxy port itself:

* ``GET /__proxy__/stats``                 JSON counters.
* ``GET /__proxy__/config?rate=0.1&modes=503,drop_request&seed=1&methods=PUT,POST&fail_next=2``
  updates any subset of the settings and returns the new config as JSON. ``fail_next=N`` makes the next N
  eligible requests fail regardless of ``rate``. ``methods`` (empty = all) restricts which requests are
  eligible for faults.
* ``GET /__proxy__/reset``                 zeroes the counters.

Run it as a separate process (it is stopped by PID):

    python tests/servers/fault_proxy.py --upstream http://127.0.0.1:5000 --port 0 --rate 0.1 --seed 0

It prints ``LISTENING <port>`` on stdout once it accepts connections. :class:`FaultProxy` wraps all of this
for tests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, cast

ALL_MODES = ("503", "drop_request", "drop_response")
CONTROL_PREFIX = "/__proxy__/"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
MAX_HEADER_BYTES = 256 * 1024
IO_CHUNK = 1 << 20


class _BadRequest(Exception):
    pass


class _ClientGone(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Server side (runs in the proxy process)
# --------------------------------------------------------------------------------------------------


class ProxyState:
    """Settings and counters shared by all connection threads."""

    def __init__(self, upstream: str, rate: float, seed: int, modes: Iterable[str], methods: Iterable[str]):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.lock = threading.Lock()
        self.rate = float(rate)
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        self.modes = self._check_modes(modes)
        self.methods = {m.upper() for m in methods if m}
        self.fail_next = 0
        self.counters: dict[str, int] = {}
        self.reset_counters()

    @staticmethod
    def _check_modes(modes: Iterable[str]) -> list[str]:
        out = [m.strip() for m in modes if m.strip()]
        bad = [m for m in out if m not in ALL_MODES]
        if bad or not out:
            raise ValueError(f"modes must be a non-empty subset of {ALL_MODES}, got {out}")
        return out

    def reset_counters(self) -> None:
        with self.lock:
            self.counters = {
                "requests": 0,
                "forwarded": 0,
                "faults": 0,
                "fault_503": 0,
                "fault_drop_request": 0,
                "fault_drop_response": 0,
                "upstream_errors": 0,
                "connections": 0,
            }

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def decide(self, method: str) -> str | None:
        """Return the fault mode for this request, or None to forward it."""
        with self.lock:
            self.counters["requests"] += 1
            if self.methods and method.upper() not in self.methods:
                return None
            if self.fail_next > 0:
                self.fail_next -= 1
            elif self.rate <= 0.0 or self.rng.random() >= self.rate:
                return None
            mode = self.rng.choice(self.modes)
            self.counters["faults"] += 1
            self.counters[f"fault_{mode}"] += 1
            return mode

    def config(self) -> dict[str, Any]:
        with self.lock:
            return {
                "rate": self.rate,
                "seed": self.seed,
                "modes": list(self.modes),
                "methods": sorted(self.methods),
                "fail_next": self.fail_next,
                "upstream": f"http://{self.upstream_host}:{self.upstream_port}",
            }

    def update(self, params: dict[str, str]) -> None:
        with self.lock:
            if "rate" in params:
                rate = float(params["rate"])
                if not 0.0 <= rate <= 1.0:
                    raise ValueError("rate must be in [0, 1]")
                self.rate = rate
            if "seed" in params:
                self.seed = int(params["seed"])
                self.rng = random.Random(self.seed)
            if "modes" in params:
                self.modes = self._check_modes(params["modes"].split(","))
            if "methods" in params:
                self.methods = {m.strip().upper() for m in params["methods"].split(",") if m.strip()}
            if "fail_next" in params:
                self.fail_next = max(0, int(params["fail_next"]))


def _read_head(rfile: BinaryIO) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    """Read a request line and headers. Returns None on a clean EOF before any byte."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests (RFC 9112 2.2)
        line = rfile.readline(65537)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise _BadRequest("request line too long or truncated")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise _BadRequest(f"bad request line {line!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    total = 0
    while True:
        h = rfile.readline(65537)
        total += len(h)
        if not h:
            raise _ClientGone("EOF in headers")
        if total > MAX_HEADER_BYTES:
            raise _BadRequest("headers too large")
        if h in (b"\r\n", b"\n"):
            break
        text = h.decode("latin-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + " " + text.strip())
            continue
        name, sep, value = text.partition(":")
        if not sep:
            raise _BadRequest(f"bad header line {h!r}")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _read_exact(rfile: BinaryIO, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = rfile.read(min(n, IO_CHUNK))
        if not b:
            raise _ClientGone("EOF in body")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _read_chunked(rfile: BinaryIO, limit: int | None = None) -> bytes:
    """Decode an HTTP/1.1 chunked body (HTTP framing only; aws-chunked content is left as is)."""
    out = bytearray()
    while True:
        size_line = rfile.readline(65537)
        if not size_line:
            raise _ClientGone("EOF in chunk size")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers
                t = rfile.readline(65537)
                if not t:
                    raise _ClientGone("EOF in trailers")
                if t in (b"\r\n", b"\n"):
                    return bytes(out)
        out += _read_exact(rfile, size)
        if limit is not None and len(out) >= limit:
            return bytes(out)
        if rfile.readline(65537) not in (b"\r\n", b"\n"):
            raise _BadRequest("missing CRLF after chunk")


def _abort(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _slowdown_body() -> bytes:
    rid = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
        f"<RequestId>{rid}</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()


def _status_line(status: int, reason: str) -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


def _encode_headers(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"


class _Handler(socketserver.BaseRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        state = self.server.state
        state.count("connections")
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = cast(BinaryIO, sock.makefile("rb", buffering=IO_CHUNK))
        try:
            while True:
                keep_open = self._one_request(sock, rfile, state)
                if not keep_open:
                    break
        except (_ClientGone, ConnectionError, TimeoutError, OSError):
            pass
        except _BadRequest as exc:
            try:
                body = str(exc).encode()
                sock.sendall(
                    _status_line(400, "Bad Request")
                    + _encode_headers([("Content-Length", str(len(body))), ("Connection", "close")])
                    + body
                )
            except OSError:
                pass
        finally:
            try:
                rfile.close()
            except OSError:
                pass

    # Returns True to keep the client connection open for the next request.
    def _one_request(self, sock: socket.socket, rfile: BinaryIO, state: ProxyState) -> bool:
        head = _read_head(rfile)
        if head is None:
            return False
        method, target, version, headers = head
        conn_hdr = (_get(headers, "connection") or "").lower()
        client_close = "close" in conn_hdr or (version == "HTTP/1.0" and "keep-alive" not in conn_hdr)

        if target.startswith(CONTROL_PREFIX):
            self._drain_body(sock, rfile, headers)
            self._control(sock, target, state)
            return not client_close

        mode = state.decide(method)

        if mode == "drop_request":
            # Read part of the body (if any), then reset: the request never reaches the server.
            self._drain_body(sock, rfile, headers, half=True)
            _abort(sock)
            return False

        body = self._drain_body(sock, rfile, headers)

        if mode == "503":
            payload = _slowdown_body()
            resp_headers = [
                ("Content-Type", "application/xml"),
                ("Content-Length", str(len(payload))),
                ("x-amz-request-id", "FAULTPROXY"),
                ("Retry-After", "0"),
                ("Connection", "close" if client_close else "keep-alive"),
            ]
            sock.sendall(
                _status_line(503, "Slow Down")
                + _encode_headers(resp_headers)
                + (b"" if method == "HEAD" else payload)
            )
            return not client_close

        return self._forward(
            sock, method, target, headers, body, state, client_close, mode == "drop_response"
        )

    def _drain_body(
        self, sock: socket.socket, rfile: BinaryIO, headers: list[tuple[str, str]], half: bool = False
    ) -> bytes:
        te = (_get(headers, "transfer-encoding") or "").lower()
        cl = _get(headers, "content-length")
        expect = (_get(headers, "expect") or "").lower()
        has_body = "chunked" in te or (cl is not None and int(cl) > 0)
        if has_body and expect == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in te:
            if half:
                return _read_chunked(rfile, limit=1)
            return _read_chunked(rfile)
        if cl is not None:
            n = int(cl)
            if n < 0:
                raise _BadRequest("negative Content-Length")
            return _read_exact(rfile, n // 2 if half else n)
        return b""

    def _control(self, sock: socket.socket, target: str, state: ProxyState) -> None:
        parsed = urllib.parse.urlsplit(target)
        cmd = parsed.path[len(CONTROL_PREFIX) :].strip("/")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        status: int = 200
        payload: dict[str, Any] = {}
        try:
            if cmd == "stats":
                with state.lock:
                    payload = dict(state.counters)
            elif cmd == "config":
                state.update(params)
                payload = state.config()
            elif cmd == "reset":
                state.reset_counters()
                payload = {"ok": True}
            else:
                status, payload = 404, {"error": f"unknown control command {cmd!r}"}
        except ValueError as exc:
            status, payload = 400, {"error": str(exc)}
        data = json.dumps(payload).encode()
        sock.sendall(
            _status_line(status, "OK" if status == 200 else "Error")
            + _encode_headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            + data
        )

    def _forward(
        self,
        sock: socket.socket,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        state: ProxyState,
        client_close: bool,
        truncate: bool,
    ) -> bool:
        # A fresh upstream connection per request: simple, and immune to stale keep-alive sockets.
        up = http.client.HTTPConnection(state.upstream_host, state.upstream_port, timeout=120)
        try:
            up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
                    continue
                up.putheader(k, v)
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                up.putheader("Content-Length", str(len(body)))
            up.putheader("Connection", "close")
            up.endheaders(body if body else None)
            resp = up.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            up.close()
            state.count("upstream_errors")
            msg = f"fault-proxy: upstream error: {exc!r}".encode()
            sock.sendall(
                _status_line(502, "Bad Gateway")
                + _encode_headers(
                    [
                        ("Content-Type", "text/plain"),
                        ("Content-Length", str(len(msg))),
                        ("Connection", "close"),
                    ]
                )
                + msg
            )
            return False

        try:
            state.count("forwarded")
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            no_body = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            length_hdr = resp.getheader("content-length")
            if no_body:
                data = b""
                streamed_len = None
            elif length_hdr is not None and resp.getheader("transfer-encoding") is None:
                data = b""
                streamed_len = int(length_hdr)
            else:  # chunked or close-delimited: buffer it and re-frame with Content-Length
                data = resp.read()
                streamed_len = None
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(len(data))))
            out_headers.append(("Connection", "close" if client_close else "keep-alive"))
            head_bytes = _status_line(resp.status, resp.reason or "") + _encode_headers(out_headers)

            if truncate:
                # Cut the response stream half-way (headers included, so body-less answers are cut too).
                body_len = streamed_len if streamed_len is not None else len(data)
                keep = (len(head_bytes) + body_len) // 2
                if keep <= len(head_bytes):
                    sock.sendall(head_bytes[:keep])
                else:
                    sock.sendall(head_bytes)
                    keep -= len(head_bytes)
                    if streamed_len is not None:
                        sent = 0
                        while sent < keep:
                            chunk = resp.read(min(IO_CHUNK, keep - sent))
                            if not chunk:
                                break
                            sock.sendall(chunk)
                            sent += len(chunk)
                    else:
                        sock.sendall(data[:keep])
                _abort(sock)
                return False

            sock.sendall(head_bytes)
            if streamed_len is not None:
                remaining = streamed_len
                while remaining > 0:
                    chunk = resp.read(min(IO_CHUNK, remaining))
                    if not chunk:
                        # Upstream died mid-body: propagate as an abrupt close.
                        _abort(sock)
                        return False
                    sock.sendall(chunk)
                    remaining -= len(chunk)
            elif data:
                sock.sendall(data)
            return not client_close
        finally:
            up.close()


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], state: ProxyState):
        super().__init__(addr, _Handler)
        self.state = state


def _watch_parent(parent_pid: int, server: _ProxyServer) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            server.shutdown()
            return
        except PermissionError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="http://host:port of the real server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed on stdout)")
    ap.add_argument("--rate", type=float, default=0.0, help="fault probability per request, 0..1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list from {ALL_MODES}")
    ap.add_argument(
        "--methods", default="", help="comma list of HTTP methods eligible for faults (empty = all)"
    )
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process disappears")
    args = ap.parse_args(argv)

    state = ProxyState(args.upstream, args.rate, args.seed, args.modes.split(","), args.methods.split(","))
    server = _ProxyServer((args.host, args.port), state)
    port = server.server_address[1]
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    print(f"LISTENING {port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------------------------------------------
# Client side (used by tests): start/stop the proxy process and drive its control endpoints
# --------------------------------------------------------------------------------------------------


class FaultProxy:
    """Handle on a fault-proxy subprocess.

    ``proxy.failure_rate = 0.1`` changes the rate at runtime; ``proxy.faults_injected`` and ``proxy.stats()``
    read the counters; ``proxy.stop()`` terminates the process by PID.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        modes: Iterable[str] = ALL_MODES,
        methods: Iterable[str] = (),
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
    ):
        self.upstream = upstream.rstrip("/")
        self.host = host
        self._rate = float(rate)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--upstream",
            self.upstream,
            "--host",
            host,
            "--port",
            "0",
            "--rate",
            str(rate),
            "--seed",
            str(seed),
            "--modes",
            ",".join(modes),
            "--methods",
            ",".join(methods),
            "--parent-pid",
            str(os.getpid()),
        ]
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        t0 = time.monotonic()
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()  # blocks until LISTENING or exit
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"fault proxy failed to start (rc={self.process.poll()}, output={line!r})")
        self.port = int(line.split()[1])
        self.startup_seconds = time.monotonic() - t0
        if self.startup_seconds > startup_timeout:
            self.stop()
            raise RuntimeError("fault proxy start timed out")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _control(self, cmd: str, **params: Any) -> dict[str, Any]:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.endpoint_url}{CONTROL_PREFIX}{cmd}" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
        return result

    def configure(
        self,
        *,
        rate: float | None = None,
        seed: int | None = None,
        modes: Iterable[str] | None = None,
        methods: Iterable[str] | None = None,
        fail_next: int | None = None,
    ) -> dict[str, Any]:
        cfg = self._control(
            "config",
            rate=rate,
            seed=seed,
            modes=",".join(modes) if modes is not None else None,
            methods=",".join(methods) if methods is not None else None,
            fail_next=fail_next,
        )
        self._rate = float(cfg["rate"])
        return cfg

    @property
    def failure_rate(self) -> float:
        return self._rate

    @failure_rate.setter
    def failure_rate(self, value: float) -> None:
        self.configure(rate=value)

    def fail_next(self, n: int = 1, modes: Iterable[str] | None = None) -> None:
        """Make the next ``n`` eligible requests fail (mode chosen from ``modes``)."""
        self.configure(fail_next=n, modes=modes)

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._control("stats").items()}

    @property
    def faults_injected(self) -> int:
        return self.stats()["faults"]

    def reset_stats(self) -> None:
        self._control("reset")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not subprocess.DEVNULL and hasattr(self._log, "close"):
            self._log.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
