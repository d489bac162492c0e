"""Model pack zips for the download tests: built from the shared test pack at test time and served
from a loopback HTTP server with Range support, which can break a response off or ignore Range."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PACK_FILES = ("det_2.5g.onnx", "mobilefacenet.onnx")


def pack_zip(
    testpack_dir: Path, folder: str = "", extra: dict[str, bytes] | None = None, files: tuple[str, ...] = PACK_FILES
) -> bytes:
    """A release-style zip of the test pack; `folder` nests the files as antelopev2.zip does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name in files:
            zf.write(testpack_dir / name, f"{folder}/{name}" if folder else name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PackServer:
    """Serves `files` (path -> bytes) on 127.0.0.1; `requests` records (path, Range header) pairs."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut_first_response_at: int | None = None  # bytes after which the first body is broken off
    ignore_range: bool = False
    range_offset_error: int = 0  # a faulty server: a ranged body starts this many bytes late
    chunk_delay_s: float = 0.0

    def start(self) -> PackServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not server.ignore_range:
                    start = int(match.group(1)) + server.range_offset_error
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                end = len(data)
                if server.cut_first_response_at is not None:
                    end, server.cut_first_response_at = server.cut_first_response_at, None
                    self.close_connection = True
                for offset in range(start, end, 256 * 1024):
                    self.wfile.write(data[offset : min(offset + 256 * 1024, end)])
                    time.sleep(server.chunk_delay_s)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def zip_requests(self, name: str) -> list[str | None]:
        """The Range headers of the requests for `<name>.zip`, in order."""
        return [rng for path, rng in self.requests if path == f"/{name}.zip"]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
