"""Helpers the single-purpose benchmarks in this folder share (free ports,
a process's CPU time, downloads, waiting for a server). Python 3.11
standard library only; the scripts import it from their own folder."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User plus system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def download(url, headers=()):
    """GETs `url` with curl, the body thrown away; (status, bytes)."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    status, size = out.split()
    return int(status), int(size)


def wait_healthy(base, proc, timeout=10):
    """Waits until Pier at `base` answers /healthz; exits if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"pier at {base} exited ({proc.returncode})")
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"pier at {base} did not start")


def serve_blob(blob, digest):
    """A fake upstream serving one blob under team/app; its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            if self.path == "/v2/":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                if body:
                    self.wfile.write(b"{}")
                return
            if self.path != f"/v2/team/app/blobs/{digest}":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            if body:
                self.wfile.write(blob)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def wait_port(port, proc, timeout=10):
    """Waits until something listens on loopback `port`; exits if `proc`
    ends or it never does (for servers without a plain-HTTP /healthz)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server on {port} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")
