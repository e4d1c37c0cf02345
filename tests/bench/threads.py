#!/usr/bin/env python3
"""Blocking threads under many slow cold fetches (issue item 7). Prints
figures; it is not a test.

Every fetch of a blob over 1 MiB writes its spool on a thread of its own.
This reproduces the worst case on loopback: a fake upstream that trickles
N distinct blobs (default 600 of 1.25 MiB, each over 20 s), all asked for
at once, and meanwhile two warm requests that need a blocking thread,
timed against the same requests with no cold fetch running:

  blob      GET of a stored 64 KiB blob, zero_copy off (as for HTTP/2
            clients): the body is read from the store on the blocking pool
  manifest  GET by digest of a stored 600 KiB manifest on the embedded
            store: too large for the in-process cache (over 512 KiB), so
            every GET reads redb on the blocking pool (two calls)

Scenarios:

  upstream  one Pier (fs + embedded) with `[fetch] max_concurrent = 0`
            (unlimited, a documented setting): the N fetches from upstream
  peer      two replicas on S3 + Redis (tests/backends.sh; the PIER_TEST_*
            variables): A fetches the N blobs with its slots raised to N
            (standing in for several replicas with 64 each), and B, with
            the default 64 slots, streams all N from A as peer downloads.
            Figures are B's; only the blob probe applies (metadata is Redis)

Reported: the Pier process's thread count (/proc/PID/status Threads) idle
and at its peak, its CPU seconds while the cold fetches ran, and probe
latencies (p50 / p99 / max). Each probe waits at most --probe-timeout
seconds. `--blobs 1 --size 268435456 --trickle 0 --trickle-chunks 1` is
one fast cold fetch instead, for what the spool writer costs in CPU.

  tests/bench/threads.py --pier $CARGO_TARGET_DIR/debug/pier [--scenario peer]

Python 3.11 standard library only.
"""

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

MiB = 1 << 20
REPO = "team/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def log(msg):
    print(f"[threads.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- upstream

def cold_body(i, size):
    """Blob i: its index, then zeros (cheap to make, distinct digests)."""
    return i.to_bytes(8, "big") + bytes(size - 8)


def big_manifest():
    """A valid image manifest padded past the in-process cache's 512 KiB."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [],
        "annotations": {"pad": "x" * (600 * 1024)},
    }
    return json.dumps(doc).encode()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


async def serve_upstream(args):
    """A registry that serves the probe blob and manifest at once and the
    cold blobs slowly: `--trickle-chunks` equal pieces over `--trickle`
    seconds."""
    cold = {}
    for i in range(args.blobs):
        cold[sha(cold_body(i, args.size))] = i
    small = os.urandom(64 * 1024)
    manifest = big_manifest()
    fixed = {sha(small): ("application/octet-stream", small)}
    manifests = {sha(manifest): manifest, "probe": manifest}
    Path(args.info).write_text(json.dumps({
        "cold": sorted(cold, key=cold.get), "small": sha(small), "manifest": sha(manifest)}))

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                method, path = method.decode(), path.decode().split("?")[0]
                await answer(writer, method, path)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(writer, method, path):
        def head(status, ctype, length, extra=""):
            writer.write((f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {length}\r\n{extra}\r\n").encode())
        parts = path.split("/")
        ref = parts[-1]
        if path == "/v2/" or path == "/v2":
            head("200 OK", "application/json", 2)
            writer.write(b"{}")
        elif "/manifests/" in path and ref in manifests:
            body = manifests[ref]
            head("200 OK", OCI_MANIFEST, len(body), f"Docker-Content-Digest: {sha(body)}\r\n")
            if method == "GET":
                writer.write(body)
        elif "/blobs/" in path and ref in fixed:
            ctype, body = fixed[ref]
            head("200 OK", ctype, len(body), f"Docker-Content-Digest: {ref}\r\n")
            if method == "GET":
                writer.write(body)
        elif "/blobs/" in path and ref in cold:
            body = cold_body(cold[ref], args.size)
            head("200 OK", "application/octet-stream", len(body), f"Docker-Content-Digest: {ref}\r\n")
            if method == "GET":
                step = -(-len(body) // args.trickle_chunks)
                pause = args.trickle / args.trickle_chunks
                for at in range(0, len(body), step):
                    writer.write(body[at:at + step])
                    await writer.drain()
                    await asyncio.sleep(pause)
        else:
            head("404 Not Found", "application/json", 2)
            writer.write(b"{}")
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


# -------------------------------------------------------------- cold load

async def cold_load(args):
    """GETs every digest at once through Pier; prints a JSON summary."""
    digests = json.loads(Path(args.info).read_text())["cold"]
    host, port = args.url.removeprefix("http://").split(":")

    async def one(i, d):
        # Spread over --ramp seconds: 600 lease claims in the same
        # millisecond time out on the Redis pool (the peer scenario), and
        # the fetches would then run unguarded instead of from the peer.
        await asyncio.sleep(args.ramp * i / len(digests))
        t0 = time.monotonic()
        try:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(f"GET /v2/corp.example/{REPO}/blobs/{d} HTTP/1.1\r\nHost: x\r\n"
                    f"Connection: close\r\n\r\n".encode())
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            got = 0
            while chunk := await r.read(1 << 16):
                got += len(chunk)
            w.close()
            return head.split(b" ")[1].decode(), got, time.monotonic() - t0
        except (OSError, asyncio.IncompleteReadError) as e:
            return f"error {e!r}", 0, time.monotonic() - t0

    results = await asyncio.gather(*(one(i, d) for i, d in enumerate(digests)))
    ok = [t for s, n, t in results if s == "200" and n == args.size]
    bad = [s for s, n, _ in results if not (s == "200" and n == args.size)]
    print(json.dumps({"ok": len(ok), "failed": len(bad), "failures": sorted(set(bad))[:5],
                      "seconds_max": max(ok, default=0), "seconds_median": statistics.median(ok) if ok else 0}))


# ------------------------------------------------------------ orchestrator

class Procs:
    def __init__(self):
        self.all = []

    def spawn(self, argv, logfile, **kw):
        p = subprocess.Popen([str(a) for a in argv], stdout=open(logfile, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.all.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.all):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.all:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_http(url, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url}: its process exited ({proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{url} did not come up")


def threads_of(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(base, name):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class ThreadWatch:
    """Samples a process's thread count every 100 ms."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, threads_of(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def probe(url, accept, timeout):
    """Seconds for one whole GET, or None when it failed or timed out."""
    req = urllib.request.Request(url, headers={"Accept": accept})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
    except OSError:
        return None
    return time.perf_counter() - t0


def probe_series(probes, seconds, timeout, deadline=None):
    """Runs the probes in turn for `seconds` (or until `deadline`, a
    callable that says stop); latencies in ms per probe, None = failed."""
    out = {name: [] for name in probes}
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (deadline and deadline()):
        for name, (url, accept) in probes.items():
            t = probe(url, accept, timeout)
            out[name].append(None if t is None else t * 1000)
        time.sleep(0.02)
    return out


def summary(samples):
    ok = sorted(x for x in samples if x is not None)
    failed = len(samples) - len(ok)
    if not ok:
        return f"no answer in {len(samples)} tries"
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
    s = f"p50 {statistics.median(ok):8.1f}  p99 {p99:8.1f}  max {ok[-1]:8.1f} ms  (n={len(samples)}"
    return s + (f", {failed} failed/timed out)" if failed else ")")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "upstream", "load"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--pier", help="the pier binary")
    ap.add_argument("--scenario", default="upstream", choices=["upstream", "peer"])
    ap.add_argument("--blobs", type=int, default=600, help="cold blobs fetched at once")
    ap.add_argument("--size", type=int, default=MiB + MiB // 4, help="bytes per cold blob (> 1 MiB)")
    ap.add_argument("--trickle", type=float, default=20.0, help="seconds upstream takes per cold blob")
    ap.add_argument("--trickle-chunks", type=int, default=20)
    ap.add_argument("--ramp", type=float, default=3.0, help="seconds over which the cold GETs start")
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds of idle probes")
    ap.add_argument("--probe-timeout", type=float, default=60.0)
    ap.add_argument("--keep", metavar="DIR", help="keep configs and logs in DIR (else a temp dir)")
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "upstream":
        return asyncio.run(serve_upstream(args))
    if args.role == "load":
        return asyncio.run(cold_load(args))
    if not args.pier:
        ap.error("--pier is required")
    procs = Procs()
    try:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            run(args, Path(args.keep).resolve(), procs)
        else:
            with tempfile.TemporaryDirectory(prefix="pier-threads-") as work:
                run(args, Path(work), procs)
    finally:
        procs.stop_all()


def run(args, work, procs):
    me = Path(__file__).resolve()
    common = ["--blobs", args.blobs, "--size", args.size, "--trickle", args.trickle,
              "--trickle-chunks", args.trickle_chunks, "--ramp", args.ramp]
    up_port, info = free_port(), work / "info.json"
    log(f"upstream: {args.blobs} cold blobs of {args.size} bytes, each over {args.trickle:g} s")
    up = procs.spawn([sys.executable, me, "--role", "upstream", "--port", up_port, "--info", info, *common],
                     work / "upstream.log")
    wait_http(f"http://127.0.0.1:{up_port}/v2/", up, timeout=120)
    names = json.loads(info.read_text())

    def start_pier(name, sections, cluster=False):
        port = free_port()
        text = (f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\n'
                f'default_registry = "corp.example"\n\n[server]\nzero_copy = false\n\n{sections}\n')
        if cluster:
            text += f'[cluster]\nadvertise_url = "http://127.0.0.1:{port}"\n\n'
        text += (f'[[upstreams]]\nregistry = "corp.example"\naliases = ["corp"]\n'
                 f'endpoints = ["http://127.0.0.1:{up_port}"]\n')
        cfg = work / f"{name}.toml"
        cfg.write_text(text)
        p = procs.spawn([args.pier, "serve", "--config", cfg], work / f"{name}.log",
                        env={**os.environ, "RUST_LOG": "warn"})
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", p)
        return p, base

    fetch_unbounded = f"[fetch]\nmax_concurrent = {0 if args.scenario == 'upstream' else args.blobs}\n"
    if args.scenario == "upstream":
        data = work / "pier"
        pier, base = start_pier("pier", f'{fetch_unbounded}\n[storage]\nkind = "fs"\npath = "{data}"\n')
        cold_base, measured = base, (pier, base)
    else:
        env = {k: os.environ.get(f"PIER_TEST_{k}", "") for k in
               ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET")}
        if not env["REDIS_URL"] or not env["S3_ENDPOINT"]:
            sys.exit("the peer scenario needs PIER_TEST_REDIS_URL and PIER_TEST_S3_ENDPOINT "
                     "(tests/backends.sh)")
        ns = f"threads-{os.getpid()}-{int(time.time())}"

        def sections(name, fetch):
            return (f'{fetch}\n[storage]\nkind = "s3"\nbucket = "{env["S3_BUCKET"] or "pier-test"}"\n'
                    f'prefix = "{ns}"\nendpoint = "{env["S3_ENDPOINT"]}"\n'
                    f'access_key_id = "{env["S3_ACCESS_KEY"]}"\nsecret_access_key = "{env["S3_SECRET_KEY"]}"\n'
                    f'spool_path = "{work / name}-spool"\nlocal_cache_path = "{work / name}-cache"\n'
                    f'local_cache_size = "4GiB"\n\n'
                    f'[metadata]\nkind = "redis"\nurl = "{env["REDIS_URL"]}"\nkey_prefix = "{ns}:"\n\n')
        # A holds the leases and fetches upstream; B (default slots) streams
        # every blob from A.
        _, a_base = start_pier("pier-a", sections("pier-a", fetch_unbounded), cluster=True)
        b, b_base = start_pier("pier-b", sections("pier-b", ""), cluster=True)
        cold_base, measured = a_base, (b, b_base)

    pier, base = measured
    probes = {"blob": (f"{base}/v2/corp.example/{REPO}/blobs/{names['small']}", "*/*")}
    if args.scenario == "upstream":
        probes["manifest"] = (f"{base}/v2/corp.example/{REPO}/manifests/{names['manifest']}", OCI_MANIFEST)
    # Each probe once, cold: stored (and, on B, kept as a local copy) before
    # any figure is taken.
    for url, accept in probes.values():
        if probe(url, accept, 30) is None:
            sys.exit(f"warming {url} failed")
    time.sleep(1)

    log(f"baseline: probes for {args.baseline:g} s with no cold fetch")
    idle_threads = threads_of(pier.pid)
    base_lat = probe_series(probes, args.baseline, args.probe_timeout)

    def load(url, name):
        return procs.spawn([sys.executable, me, "--role", "load", "--url", url, "--info", info, *common],
                           work / f"{name}.out")

    watch = ThreadWatch(pier.pid)
    cpu0 = cpu_seconds(pier.pid)
    t0 = time.monotonic()
    loads = [load(cold_base, "load-a")]
    if args.scenario == "peer":
        # B's requests must find A's leases taken: wait for A's fetches.
        while metric(cold_base, "pier_blob_fetches_in_flight") < args.blobs * 0.95 and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        loads.append(load(base, "load-b"))
    log(f"{args.blobs} cold fetches started; probing while they run")
    load_lat = probe_series(probes, 3600, args.probe_timeout,
                            deadline=lambda: all(p.poll() is not None for p in loads))
    for p in loads:
        p.wait()
    watch.stop.set()
    watch.t.join()
    took = time.monotonic() - t0
    cpu = cpu_seconds(pier.pid) - cpu0
    after_threads = threads_of(pier.pid)
    outcome = [json.loads((work / f"{n}.out").read_text() or "{}") for n in
               (["load-a"] + (["load-b"] if args.scenario == "peer" else []))]

    who = "Pier" if args.scenario == "upstream" else "replica B"
    print(f"\nscenario {args.scenario}: {args.blobs} cold blobs of {args.size} bytes, "
          f"{args.trickle:g} s each from upstream; {took:.1f} s in all")
    for n, o in zip(("clients of Pier" if args.scenario == "upstream" else "clients of A", "clients of B"),
                    outcome):
        print(f"  {n}: {o.get('ok')} ok, {o.get('failed')} failed {o.get('failures') or ''}"
              f" (median {o.get('seconds_median', 0):.1f} s, max {o.get('seconds_max', 0):.1f} s)")
    print(f"  {who} threads: idle {idle_threads}, peak {watch.peak} while fetching, "
          f"{after_threads} right after; {cpu:.2f} CPU-s (probes included)")
    for name in probes:
        print(f"  {name:8} idle:       {summary(base_lat[name])}")
        print(f"  {name:8} cold load:  {summary(load_lat[name])}")


if __name__ == "__main__":
    main()
