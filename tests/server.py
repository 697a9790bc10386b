"""An HTTP server on 127.0.0.1 standing in for OpenAI's bucket and the Hugging Face Hub, with injectable faults."""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what "main" resolves to on the stand-in Hub


@dataclass
class Fault:
    """What to do to the next matching request.

    kinds: status, drop (close after `after` bytes), reset (a TCP reset after `after` bytes), stall (send `after`
    bytes, then nothing for `delay` seconds, then close), corrupt, slow (`delay` seconds per 64 KiB), trickle (one
    byte every `delay` seconds, until the client leaves), ignore_range, bad_range (answer a Range request with a 206
    whose Content-Range and body start `after` bytes later than asked), body (serve `body` instead of the file: an
    HTML page, a truncated file), hook (send `after` bytes, call `hook()` in the server's thread, then send the rest:
    something that happens to the client's machine mid-download).
    """

    kind: str
    status: int = 503
    after: int = 0
    delay: float = 0.0
    times: int = 1  # how many requests it applies to
    body: bytes = b""
    hook: Callable[[], None] | None = None


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the Hub's branches and tags -> commits; a commit's files are files["/hf/{org}/{repo}/{file}"] for COMMIT, else
    # files["/hf/{commit}/{org}/{repo}/{file}"]; any other revision is answered 404 RevisionNotFound
    revisions: dict[str, str] = field(default_factory=lambda: {"main": COMMIT})
    # Hub files kept in git rather than LFS: path -> their git blob id, sent as the ETag (no X-Linked-Etag), which
    # huggingface_hub names their blob by; every other file is served as LFS, named by its sha256
    git_ids: dict[str, str] = field(default_factory=dict)

    def commit_of(self, revision: str) -> str | None:
        return self.revisions.get(revision) or (revision if revision in self.revisions.values() else None)

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


def _hf_path(path: str, served: Served) -> tuple[str, str | None] | None:
    """/{org}/{repo}/resolve/{rev}/{file} -> (/hf/{org}/{repo}/{file} or /hf/{commit}/..., the commit or None)"""
    m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
    if not m:
        return None
    commit = served.commit_of(urllib.parse.unquote(m.group(3)))
    where = "" if commit in (None, COMMIT) else f"/{commit}"
    return f"/hf{where}/{m.group(1)}/{m.group(2)}/{m.group(4)}", commit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _lookup(self) -> tuple[str, bytes | None]:
        path = self.path.split("?")[0]
        hub = _hf_path(path, self.served)
        self.commit = hub[1] if hub else None
        key = hub[0] if hub else path
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
        if key.startswith("/hf/") and self.commit is None:
            return self._empty(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
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
        if partial and fault and fault.kind == "bad_range":
            start = min(start + fault.after, len(data) - 1)
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
        if key.startswith("/hf/") and key in self.served.git_ids:
            self.send_header("ETag", f'"{self.served.git_ids[key]}"')
            self.send_header("X-Repo-Commit", self.commit or COMMIT)
        elif key.startswith("/hf/"):
            etag = hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", self.commit or COMMIT)
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
        if fault and fault.kind == "hook" and fault.hook is not None:
            self.wfile.write(body[:fault.after])
            self.wfile.flush()
            fault.hook()
            body = body[fault.after:]
        step = 1 if fault and fault.kind == "trickle" else 1 << 16
        for i in range(0, len(body), step):
            if fault and fault.kind in ("slow", "trickle"):
                time.sleep(fault.delay)
            try:
                self.wfile.write(body[i:i + step])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
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
