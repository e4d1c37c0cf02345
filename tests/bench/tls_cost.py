#!/usr/bin/env python3
"""What HTTPS costs when Pier serves blobs. Prints figures; it is not a test.

One warm blob (256 MiB by default), read whole with curl over HTTP/1.1 by 1
and by 2 clients at a time, from, in turn:

  pier-http        Pier, plain HTTP: the bytes go by sendfile(2)
  pier-http-copy   Pier, plain HTTP, `zero_copy = false`: through user space
  pier-https       Pier, `[server] tls_cert`: through rustls (AES-GCM)
  nginx-https      nginx with OpenSSL, the same bytes from a file, sendfile on

For each: the server's CPU seconds per GiB served (utime + stime of its
processes, from /proc) and the clients' total MiB/s. Certificates come from
a throwaway CA made with the `openssl` command; clients trust it with
--cacert (verification on). Everything listens on loopback and stops at the
end.

  tests/bench/tls_cost.py --pier target/release/pier [--size-mib 256] [--rounds 5]

Needs curl, openssl and nginx (Debian: curl openssl nginx-light). Python
3.11 standard library only.
"""

import argparse
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import cpu_seconds, free_port, serve_blob, wait_healthy, wait_port

MiB = 1 << 20
GiB = 1 << 30


def tree_cpu(pid):
    """CPU seconds of `pid` and its children (nginx's workers)."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += cpu_seconds(int(entry.name))
    return total


def make_certs(work):
    """A CA and a server certificate for 127.0.0.1 (ECDSA P-256, as ACME
    issuers give by default); paths of the CA, chain and key."""

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca, key, csr, leaf = (work / n for n in ("ca.key", "ca.crt", "tls.key", "tls.csr", "leaf.crt"))
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    openssl("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=pier bench CA", "-days", "2", "-out", str(ca))
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/CN=127.0.0.1", "-out", str(csr))
    ext = work / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(leaf))
    chain = work / "tls.crt"
    chain.write_text(leaf.read_text() + ca.read_text())
    return ca, chain, key


def curl_round(url, clients, size, cacert):
    """`clients` curls at once, each reading `url` whole; wall seconds."""
    cmd = ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    if cacert:
        cmd += ["--cacert", str(cacert)]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        status, got = out.split()
        if status != "200" or int(got) != size:
            sys.exit(f"{url}: status {status}, {got} bytes")
    return time.monotonic() - started


def start_pier(binary, work, name, upstream, port, extra):
    d = work / name
    d.mkdir()
    config = d / "pier.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\ndefault_registry = "corp.example"\n'
        f"{extra}\n"
        f'[storage]\nkind = "fs"\npath = "{d}/data"\n'
        f'[[upstreams]]\nregistry = "corp.example"\nendpoints = ["{upstream}"]\n'
    )
    return subprocess.Popen([binary, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(d / "pier.log", "w"))


def start_nginx(work, port, blob_file, chain, key):
    d = work / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp;
  sendfile on;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {chain};
    ssl_certificate_key {key};
    location = /blob {{ alias {blob_file}; }}
  }}
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(name, proc, url, size, cacert, rounds, clients_list):
    rows = []
    for clients in clients_list:
        per_gib, speed = [], []
        for _ in range(rounds):
            before = tree_cpu(proc.pid)
            wall = curl_round(url, clients, size, cacert)
            used = tree_cpu(proc.pid) - before
            per_gib.append(used / (clients * size / GiB))
            speed.append(clients * size / MiB / wall)
        rows.append((name, clients, statistics.median(per_gib), statistics.median(speed)))
        print(f"  {name:15} {clients} client(s): {rows[-1][2]:.2f} cpu-s/GiB, {rows[-1][3]:.0f} MiB/s",
              flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier", required=True)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = random.Random(11)
    blob = b"".join(rng.randbytes(MiB) for _ in range(args.size_mib))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    upstream = serve_blob(blob, digest)
    work = Path(tempfile.mkdtemp(prefix="pier-tls-bench-"))
    try:
        run(args, blob, digest, upstream, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, blob, digest, upstream, work):
    work.chmod(0o755)  # nginx's workers read the blob file as nobody
    ca, chain, key = make_certs(work)
    blob_file = work / "blob"
    blob_file.write_bytes(blob)
    path = f"/v2/corp.example/team/app/blobs/{digest}"
    tls = f'[server]\ntls_cert = "{chain}"\ntls_key = "{key}"\n'
    servers = [
        ("pier-http", "http", ""),
        ("pier-http-copy", "http", "[server]\nzero_copy = false\n"),
        ("pier-https", "https", tls),
    ]
    rows = []
    print(f"Server CPU seconds per GiB and MiB/s, {args.size_mib} MiB warm blob, "
          f"median of {args.rounds} rounds, curl --http1.1:", flush=True)
    for name, scheme, extra in servers:
        port = free_port()
        proc = start_pier(args.pier, work, name, upstream, port, extra)
        try:
            if scheme == "http":
                wait_healthy(f"http://127.0.0.1:{port}", proc)
            else:
                wait_port(port, proc)
            url = f"{scheme}://127.0.0.1:{port}{path}"
            cacert = ca if scheme == "https" else None
            curl_round(url, 1, len(blob), cacert)  # cold: fetched and stored
            time.sleep(1)
            rows += measure(name, proc, url, len(blob), cacert, args.rounds, (1, 2))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)
    port = free_port()
    nginx = start_nginx(work, port, blob_file, chain, key)
    try:
        wait_port(port, nginx)
        rows += measure("nginx-https", nginx, f"https://127.0.0.1:{port}/blob", len(blob), ca,
                        args.rounds, (1, 2))
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=20)
    print("\n| server | clients | cpu-s/GiB | MiB/s |\n|---|---:|---:|---:|")
    for name, clients, cpu, speed in rows:
        print(f"| {name} | {clients} | {cpu:.2f} | {speed:.0f} |")
    ktls = Path("/proc/net/tls_stat").exists()
    print(f"\nkernel TLS (CONFIG_TLS) on this host: {'yes' if ktls else 'no'}; kernel {os.uname().release}")


if __name__ == "__main__":
    main()
