"""An HTTP server on 127.0.0.1 standing in for OpenAI's bucket and the Hugging Face Hub, with injectable faults."""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Fault:
    """What to do to the next matching request.

    kinds: status, drop (close after `after` bytes), reset (a TCP reset after `after` bytes), stall (send `after`
    bytes, then nothing for `delay` seconds, then close), corrupt, slow (`delay` seconds per 64 KiB), ignore_range,
    body (serve `body` instead of the file: an HTML page, a truncated file).
    """

    kind: str
    status: int = 503
    after: int = 0
    delay: float = 0.0
    times: int = 1  # how many requests it applies to
    body: bytes = b""


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, path: str, fault: Fault) -> None:
        with self.lock:
            self.faults.setdefault(path, []).append(fault)

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(path)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def requests(self, method: str | None = None, path_part: str = "") -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method) and path_part in r[1]]


def _hf_path(path: str) -> str | None:
    """/{org}/{repo}/resolve/{rev}/{file} -> hf/{org}/{repo}/{file}"""
    m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/[^/]+/(.+)", path)
    return f"/hf/{m.group(1)}/{m.group(2)}/{m.group(3)}" if m else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _lookup(self) -> tuple[str, bytes | None]:
        path = self.path.split("?")[0]
        key = _hf_path(path) or path
        return key, self.served.files.get(key)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        key, data = self._lookup()
        with self.served.lock:
            self.served.log.append((self.command, self.path, self.headers.get("Range")))
        fault = None if head else self.served.take_fault(key)  # faults are for GETs (the Hub client HEADs first)
        if fault and fault.kind == "status":
            return self._empty(fault.status)
        if data is None:
            return self._empty(404)
        start = 0
        rng = self.headers.get("Range")
        partial = rng is not None and not (fault and fault.kind == "ignore_range")
        if partial:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        if fault and fault.kind == "body":
            body = fault.body[start:]
        if fault and fault.kind == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if key.startswith("/hf/"):
            etag = hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", f'"{etag}"')
        self.end_headers()
        if head:
            return
        if fault and fault.kind in ("drop", "reset", "stall"):
            self.wfile.write(body[:fault.after])
            self.wfile.flush()
            self.close_connection = True
            if fault.kind == "stall":
                time.sleep(fault.delay)  # bounded: the test sets the client's read timeout below it
            if fault.kind == "reset":  # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            self.connection.shutdown(2)
            return
        for i in range(0, len(body), 1 << 16):
            if fault and fault.kind == "slow":
                time.sleep(fault.delay)
            try:
                self.wfile.write(body[i:i + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                return

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer:
    """Serves `served.files` on 127.0.0.1 from a daemon thread."""

    def __init__(self) -> None:
        self.served = Served()
        handler = type("BoundHandler", (Handler,), {"served": self.served})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # close() waits a poll
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
