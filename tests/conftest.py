"""Test-session settings: one torch thread per pytest-xdist worker (the workers already fill the cores;
more threads than cores only slows every worker down); offline (VERTEBRA_OFFLINE) unless a test serves weights."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# no test reaches the internet: `vertebra train` without --scratch would try a network's published weights first
# (the weights tests unset this and serve the files on 127.0.0.1: the weights_server fixture)
os.environ.setdefault("VERTEBRA_OFFLINE", "1")


# --- a loopback download server for the weights tests (no internet in tests) ------------------------------------

import hashlib  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import pytest  # noqa: E402


class WeightsServer:
    """Files served on 127.0.0.1 under ``/<host>/<path>`` of their real URL, the layout ``VERTEBRA_MIRROR``
    expects. ``requests`` lists every path asked for; ``truncate[path] = n`` sends only ``n`` bytes of that file
    while announcing its whole length (a connection that drops mid-transfer)."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.truncate: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                f = server.root / path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                body = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.truncate.get(path, len(body))])
                self.wfile.flush()
                if path in server.truncate:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, url: str, data: bytes) -> str:
        """Serve ``data`` as the file at ``url`` (an https URL of the real source); returns its sha256."""
        parts = urlsplit(url)
        path = f"/{parts.netloc}{parts.path}"
        dst = self.root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A loopback server standing in for download.pytorch.org and huggingface.co: ``VERTEBRA_MIRROR`` points at it,
    ``VERTEBRA_HOME`` is a fresh folder, ``VERTEBRA_OFFLINE`` is unset."""
    server = WeightsServer(tmp_path / "served")
    monkeypatch.setenv("VERTEBRA_MIRROR", server.url)
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VERTEBRA_OFFLINE", raising=False)
    yield server
    server.close()
