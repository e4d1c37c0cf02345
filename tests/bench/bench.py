#!/usr/bin/env python3
"""Pier's benchmark (issue 4). Prints figures; it is not a test.

Run it through tests/bench/run.sh, which installs the tools and builds Pier.

In one run, on loopback only, with every server started here in a temp dir
and stopped at the end (also on Ctrl-C or an error):

  upstream   docker-registry (CNCF distribution 2.8) holding generated images:
             library/big:latest (one 256 MiB layer), library/many:latest
             (20 small layers), library/alpine:latest (amd64 + arm64 index)
  pier-fs    Pier, fs store + embedded metadata
  pier-s3    two Pier replicas on SeaweedFS S3 + Redis (tests/backends.sh),
             each with a local cache of blob copies; clients are spread
             across the two replicas directly (client i goes to replica
             i % 2), no load balancer in between
  pier-s3-bucket  the same two replicas' setup without local caches (every
             blob read is a GET from the bucket); warm blobs only
  dist       docker-registry with proxy.remoteurl (registry:2 pull-through)
  nginx      nginx serving the 256 MiB blob file from disk (sendfile on)
  nginx-cache  nginx as a caching reverse proxy of the upstream (proxy_cache,
             cache lock on): streams to the client while it writes its cache
             file, verifies nothing; cold figures only
  direct     the upstream itself (no mirror)
  s3         a signed GET of the same blob straight from SeaweedFS

Figures (medians over several runs, printed with the run count):
  warm blob throughput with 1/2/4/8 curl clients and the server's CPU seconds
  per GiB (utime+stime of all its processes from /proc/PID/stat); cold
  whole-image pull time with skopeo; cold time to first byte of the big blob;
  upstream GETs per blob with 32 concurrent cold clients (from the upstream's
  access log); warm manifest-by-tag requests/s and latency with wrk at
  8/32/64 connections; idle RSS and peak RSS (VmHWM) while 32 clients stream
  the 256 MiB blob.

Python 3.11 standard library, plus matplotlib for the plot.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json, "
          "application/vnd.docker.distribution.manifest.v2+json")
MiB = 1 << 20
GiB = 1 << 30
CLK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLORS = {"nginx": "C0", "direct": "C1", "dist": "C2", "pier-fs": "C3", "pier-s3": "C4", "s3": "C5",
          "pier-s3-bucket": "C6", "nginx-cache": "C7"}

LABELS = {
    "nginx": "nginx, static file (sendfile)",
    "direct": "upstream direct (docker-registry)",
    "dist": "distribution proxy (registry:2)",
    "pier-fs": "Pier, fs + embedded",
    "pier-s3": "Pier, S3 + Redis, 2 replicas, local caches",
    "pier-s3-bucket": "Pier, S3 + Redis, 2 replicas, no local cache",
    "s3": "SeaweedFS S3, direct GET",
    "nginx-cache": "nginx, caching proxy (proxy_cache)",
}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


# ------------------------------------------------------------------ /proc

def proc_stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def descendants(pid):
    """pid and every process below it."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(proc_stat_fields(int(d))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            f = proc_stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime
    return total / CLK


def system_busy():
    """Fraction of all CPUs busy over the next half second (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(0.5)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ processes

class Proc:
    def __init__(self, name, popen, logfile):
        self.name = name
        self.p = popen
        self.log = logfile

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None


class Procs:
    """Every process this run starts; each leads its own process group, and
    is stopped by that group's id."""

    def __init__(self):
        self.live = []
        self.early_exits = []

    def spawn(self, name, argv, logfile, env=None, errfile=None):
        with open(logfile, "ab") as out, open(errfile or os.devnull, "ab") as err:
            p = subprocess.Popen([str(a) for a in argv], stdout=out,
                                 stderr=err if errfile else subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        proc = Proc(name, p, logfile)
        self.live.append(proc)
        return proc

    def stop(self, proc, timeout=15):
        if proc not in self.live:
            return
        self.live.remove(proc)
        rc = proc.p.poll()
        if rc is not None:
            self.early_exits.append({"name": proc.name, "rc": rc, "log": str(proc.log)})
            log(f"WARNING: {proc.name} had already exited with {rc} (log {proc.log})")
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything left in its group (nginx workers, ...)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self):
        for proc in reversed(list(self.live)):
            self.stop(proc)


def wait_http(url, proc=None, timeout=60, ok=lambda code: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.p.returncode}); see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status):
                    return
        except urllib.error.HTTPError as e:
            if ok(e.code):
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


# ------------------------------------------------------------------ servers

class Server:
    """One thing clients fetch from: its base URLs, how image names are
    spelt on it, and the processes whose CPU and memory count for it."""

    def __init__(self, key, procs, bases, prefix="", side_pids=(), curl_args=(), blob_path=None):
        self.key = key
        self.procs = procs          # list of Proc (one per replica)
        self.bases = bases          # one base URL per replica
        self.prefix = prefix        # "docker.io/library/" (Pier) or "library/"
        self.side_pids = list(side_pids)  # backends (weed, redis) reported apart
        self.curl_args = list(curl_args)
        self.blob_path = blob_path  # fixed blob URL path (nginx, s3)

    def blob_url(self, i, repo, digest):
        base = self.bases[i % len(self.bases)]
        if self.blob_path:
            return base + self.blob_path
        return f"{base}/v2/{self.prefix}{repo}/blobs/{digest}"

    def manifest_url(self, i, repo, ref):
        return f"{self.bases[i % len(self.bases)]}/v2/{self.prefix}{repo}/manifests/{ref}"

    def pull_ref(self, repo, tag):
        return f"docker://{self.bases[0].removeprefix('http://')}/{self.prefix}{repo}:{tag}"

    def pids(self):
        out = []
        for p in self.procs:
            out.extend(descendants(p.pid))
        return out

    def check_alive(self):
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.p.returncode}); see {p.log}")

    def rss(self, field):
        """Per replica: the field summed over the replica's process tree."""
        out = []
        for p in self.procs:
            vals = [status_kib(pid, field) for pid in descendants(p.pid)]
            out.append(sum(v for v in vals if v is not None) / 1024)
        return out


# ------------------------------------------------------------------ the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.work = Path(tempfile.mkdtemp(prefix="pier-bench.", dir=args.workdir))
        for d in ("logs", "cfg", "pulls"):
            (self.work / d).mkdir()
        self.pier = str(Path(args.pier).resolve())
        self.seq = 0
        self.last_side_cpu = None
        self.backends_dir = None
        self.backends_pgid = None
        self.res = {"meta": {}, "warm": [], "manifest": [], "cold_pull": [], "cold_ttfb": [],
                    "cold32": [], "rss": [], "errors": []}
        self.w = {}

    def name(self, what):
        self.seq += 1
        return f"{what}-{self.seq}"

    def error(self, msg):
        log("ERROR: " + msg)
        self.res["errors"].append(msg)

    # ---------------------------------------------------------- setup

    def meta(self):
        def out(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except Exception as e:  # noqa: BLE001 - informational only
                return f"? ({e})"
        rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.strip()
        self.res["meta"] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "pier": self.pier,
            "pier_git": self.args.pier_rev or (rev + ("+dirty src/" if dirty else "")),
            "versions": {
                "docker-registry": out(["docker-registry", "--version"]),
                "nginx": out(["nginx", "-v"]),
                "skopeo": out(["skopeo", "--version"]),
                "wrk": out(["wrk", "-v"]),
                "curl": out(["curl", "--version"]),
                "redis": out(["redis-server", "--version"]),
                "weed": out(["weed", "version"]),
            },
            "quick": self.args.quick, "runs": self.args.runs, "cold_runs": self.args.cold_runs,
            "wrk_runs": self.args.wrk_runs, "cold32_runs": self.args.cold32_runs, "wrk_seconds": self.args.wrk_seconds,
            "big_mib": self.args.big_mib,
        }

    def gen_images(self):
        gen = ROOT / "tests/fixtures/gen_images.py"
        lay = self.work / "layouts"
        specs = [
            ("big", ["--layers", "0", "--big-mib", str(self.args.big_mib)], False),
            ("many", ["--layers", "20", "--layer-size", str(self.args.small_layer)], False),
            ("alpine", ["--arch", "amd64", "--arch", "arm64", "--layers", "1"], True),
        ]
        log(f"generating images ({self.args.big_mib} MiB layer, 20 x {self.args.small_layer} B layers, "
            "2-arch index)")
        for repo, extra, _ in specs:
            subprocess.run([sys.executable, gen, "--out", lay / repo, "--tag", "latest",
                            "--seed", f"bench/library/{repo}:latest", *extra], check=True)
        self.start_upstream()
        log("pushing images to the upstream")
        for repo, _, multi in specs:
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                            *(["--all"] if multi else []),
                            f"oci:{lay / repo}:latest",
                            f"docker://127.0.0.1:{self.up_port}/library/{repo}:latest"], check=True)
        shutil.rmtree(lay)

        def manifest(repo, ref):
            req = urllib.request.Request(f"{self.up_url}/v2/library/{repo}/manifests/{ref}",
                                         headers={"Accept": ACCEPT})
            with urllib.request.urlopen(req) as r:
                return json.load(r)
        big = manifest("big", "latest")
        self.big = big["layers"][-1]["digest"]
        self.big_size = big["layers"][-1]["size"]
        many = manifest("many", "latest")
        self.many_blobs = [many["config"]["digest"]] + [layer["digest"] for layer in many["layers"]]
        self.many_sizes = {many["config"]["digest"]: many["config"]["size"],
                           **{layer["digest"]: layer["size"] for layer in many["layers"]}}
        idx = manifest("alpine", "latest")
        assert idx["mediaType"].endswith("index.v1+json"), idx
        log(f"big blob {self.big} ({self.big_size / MiB:.1f} MiB), many: {len(self.many_blobs)} blobs")
        self.res["meta"]["images"] = {"big_blob": self.big, "big_size": self.big_size,
                                      "many_blobs": len(self.many_blobs),
                                      "many_bytes": sum(self.many_sizes.values())}

    def registry_config(self, name, port, root, proxy=None):
        cfg = self.work / "cfg" / f"{name}.yml"
        text = (f"version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {root}\n  cache:\n    blobdescriptor: inmemory\n"
                f"  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n"
                f"http:\n  addr: 127.0.0.1:{port}\n  secret: pier-bench\n")
        if proxy:
            text += f"proxy:\n  remoteurl: {proxy}\n"
        cfg.write_text(text)
        return cfg

    def start_upstream(self):
        self.up_port = free_port()
        self.up_url = f"http://127.0.0.1:{self.up_port}"
        root = self.work / "upstream"
        root.mkdir()
        cfg = self.registry_config("upstream", self.up_port, root)
        # stdout is the access log (Apache combined); one file for the run.
        self.up_log = self.work / "logs" / "upstream.access.log"
        self.upstream = self.procs.spawn("upstream", ["docker-registry", "serve", cfg], self.up_log,
                                         errfile=self.work / "logs" / "upstream.err.log")
        wait_http(f"{self.up_url}/v2/", self.upstream)

    def start_backends(self):
        d = self.work / "backends"
        p = subprocess.Popen(["bash", ROOT / "tests/backends.sh", "start", d], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
        self.backends_dir, self.backends_pgid = d, p.pid
        out, _ = p.communicate(timeout=120)
        if p.returncode:
            raise RuntimeError(f"tests/backends.sh start failed ({p.returncode}); logs in {d}")
        env = dict(re.findall(r"^export (\w+)=(\S*)$", out, re.M))
        self.s3_endpoint = env["PIER_TEST_S3_ENDPOINT"]
        self.s3_bucket = env["PIER_TEST_S3_BUCKET"]
        self.s3_key, self.s3_secret = env["PIER_TEST_S3_ACCESS_KEY"], env["PIER_TEST_S3_SECRET_KEY"]
        self.redis_url = env["PIER_TEST_REDIS_URL"]
        self.weed_pid = int((d / "weed.pid").read_text())
        self.redis_pid = int((d / "redis.pid").read_text())
        log(f"backends: redis {self.redis_url}, S3 {self.s3_endpoint}")

    def stop_backends(self):
        if not self.backends_dir:
            return
        pids = []
        for n in ("weed", "redis"):
            try:
                pids.append(int((self.backends_dir / f"{n}.pid").read_text()))
            except (OSError, ValueError):
                pass
        subprocess.run(["bash", ROOT / "tests/backends.sh", "stop", self.backends_dir],
                       capture_output=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        try:
            os.killpg(self.backends_pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.backends_dir = None

    # ---------------------------------------------------------- server factories

    def start_pier(self, name, sections, cluster=False):
        port = free_port()
        text = f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\n\n{sections}\n'
        if cluster:
            text += f'[cluster]\nadvertise_url = "http://127.0.0.1:{port}"\n\n'
        text += f'[[upstreams]]\nregistry = "docker.io"\nendpoints = ["{self.up_url}"]\n'
        cfg = self.work / "cfg" / f"{name}.toml"
        cfg.write_text(text)
        proc = self.procs.spawn(name, [self.pier, "serve", "--config", cfg],
                                self.work / "logs" / f"{name}.log")
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        return proc, f"http://127.0.0.1:{port}"

    def pier_fs(self, data=None):
        name = self.name("pier-fs")
        data = data or self.work / name
        proc, base = self.start_pier(name, f'[storage]\nkind = "fs"\npath = "{data}"\n')
        srv = Server("pier-fs", [proc], [base], "docker.io/library/")
        srv.data = data
        return srv

    def pier_s3(self, ns=None, local=True):
        ns = ns or f"bench-{os.getpid()}-{self.seq + 1}"
        procs, bases = [], []
        for replica in "ab":
            name = self.name(f"pier-s3{replica}")
            cache = (f'local_cache_path = "{self.work / name}-cache"\nlocal_cache_size = "4GiB"\n'
                     if local else "")
            sections = (f'[storage]\nkind = "s3"\nbucket = "{self.s3_bucket}"\nprefix = "{ns}"\n'
                        f'endpoint = "{self.s3_endpoint}"\naccess_key_id = "{self.s3_key}"\n'
                        f'secret_access_key = "{self.s3_secret}"\nspool_path = "{self.work / name}-spool"\n'
                        f'{cache}\n'
                        f'[metadata]\nkind = "redis"\nurl = "{self.redis_url}"\nkey_prefix = "{ns}:"\n\n')
            proc, base = self.start_pier(name, sections, cluster=True)
            procs.append(proc)
            bases.append(base)
        srv = Server("pier-s3" if local else "pier-s3-bucket", procs, bases, "docker.io/library/",
                     side_pids=[self.weed_pid, self.redis_pid])
        srv.ns = ns
        return srv

    def dist(self, root=None):
        name = self.name("dist")
        root = root or self.work / name
        root.mkdir(exist_ok=True)
        port = free_port()
        cfg = self.registry_config(name, port, root, proxy=self.up_url)
        proc = self.procs.spawn(name, ["docker-registry", "serve", cfg], self.work / "logs" / f"{name}.log")
        wait_http(f"http://127.0.0.1:{port}/v2/", proc)
        srv = Server("dist", [proc], [f"http://127.0.0.1:{port}"], "library/")
        srv.root = root
        return srv

    def direct(self):
        return Server("direct", [self.upstream], [self.up_url], "library/")

    def start_nginx(self, name, d, http, location):
        """nginx on a free loopback port with its files under d: `http` goes
        into the http block, `location` into `location /`."""
        port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(f"    {t}_temp_path {d}/{t};\n"
                        for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = d / "nginx.conf"
        conf.write_text(
            f"daemon off;\n{user}worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log off;\n    sendfile on;\n    tcp_nopush on;\n"
            f"    default_type application/octet-stream;\n{temps}{http}"
            f"    server {{\n        listen 127.0.0.1:{port};\n        root {d}/www;\n"
            f"        location / {{\n{location}        }}\n    }}\n}}\n")
        proc = self.procs.spawn(name, ["nginx", "-e", d / "error.log", "-p", d, "-c", conf],
                                self.work / "logs" / f"{name}.log")
        return proc, f"http://127.0.0.1:{port}"

    def nginx(self, blob_file):
        name = self.name("nginx")
        d = self.work / name
        (d / "www").mkdir(parents=True)
        try:
            os.link(blob_file, d / "www" / "blob")  # same inode, same page cache
        except OSError:
            shutil.copyfile(blob_file, d / "www" / "blob")
        proc, base = self.start_nginx(name, d, "", "")
        wait_http(f"{base}/blob", proc)
        return Server("nginx", [proc], [base], blob_path="/blob")

    def nginx_cache(self):
        """nginx as a caching reverse proxy in front of the upstream: the
        least a mirror can do on a cold pull (stream to the client while
        writing a cache file, no digest check), for the cold figures."""
        name = self.name("nginx-cache")
        d = self.work / name
        (d / "www").mkdir(parents=True)
        http = (f"    proxy_cache_path {d}/cache levels=1:2 keys_zone=mirror:16m max_size=8g inactive=1d "
                f"use_temp_path=off;\n"
                f"    upstream registry {{ server {self.up_url.removeprefix('http://')}; keepalive 32; }}\n")
        location = ("            proxy_pass http://registry;\n"
                    "            proxy_http_version 1.1;\n"
                    "            proxy_set_header Connection \"\";\n"
                    "            proxy_cache mirror;\n"
                    "            proxy_cache_key $request_method$request_uri$http_accept;\n"
                    "            proxy_cache_valid 200 1d;\n"
                    "            proxy_cache_lock on;\n"
                    "            proxy_buffers 16 64k;\n")
        proc, base = self.start_nginx(name, d, http, location)
        wait_http(f"{base}/v2/", proc)
        srv = Server("nginx-cache", [proc], [base], "library/")
        srv.root = d / "cache"
        return srv

    def s3_direct(self, ns):
        return Server("s3", [], [self.s3_endpoint], side_pids=[],
                      curl_args=["--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                                 f"{self.s3_key}:{self.s3_secret}"],
                      blob_path=f"/{self.s3_bucket}/{ns}/blobs/sha256/{self.big.split(':')[1]}")

    def stop(self, srv):
        for p in srv.procs:
            if p is not self.upstream:
                self.procs.stop(p)

    def retire(self, srv):
        """Stops a cold-section server and deletes what it cached, then waits
        for the disk to write back everything pending, so that no figure
        pays for the writeback of an earlier one (distribution does not
        fsync its blobs; a run leaves up to 1 GiB of dirty pages behind)."""
        self.stop(srv)
        for d in (getattr(srv, "data", None), getattr(srv, "root", None)):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        os.sync()
        # The S3 server goes on storing what Pier uploaded after its client
        # was served (SeaweedFS spends seconds of CPU on a 256 MiB object):
        # the next figure starts once it is idle.
        if srv.side_pids:
            deadline = time.monotonic() + 30
            before = cpu_seconds(srv.side_pids)
            while time.monotonic() < deadline:
                time.sleep(0.5)
                now = cpu_seconds(srv.side_pids)
                if now - before < 0.05:
                    break
                before = now
        # Cold figures are single runs of a second or two: each starts on
        # cores no longer busy with anything left over (another process on
        # the machine, writeback threads), for at most 15 s.
        deadline = time.monotonic() + 15
        while system_busy() > 0.15 and time.monotonic() < deadline:
            pass

    # ---------------------------------------------------------- clients

    def curl_batch(self, client_urls, extra=(), timeout=900, headers=()):
        """One curl per client, all at once; each fetches its URLs in order.
        Returns (wall seconds, transfers, failed curls)."""
        fmt = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}\\n"
        hdr = [a for h in headers for a in ("-H", h)]
        procs = []
        t0 = time.perf_counter()
        for urls in client_urls:
            argv = ["curl", "-s", "--max-time", str(timeout), "-w", fmt, *hdr, *extra]
            for u in urls:
                argv += [u, "-o", "/dev/null"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        xfers, failed = [], 0
        for p in procs:
            out, _ = p.communicate()
            failed += p.returncode != 0
            for line in out.splitlines():
                code, size, total, ttfb = line.split()
                xfers.append({"code": int(code), "size": int(size), "time": float(total), "ttfb": float(ttfb)})
        return time.perf_counter() - t0, xfers, failed

    def sha256_of(self, url, extra=()):
        p = subprocess.Popen(["curl", "-sf", *extra, url], stdout=subprocess.PIPE)
        h, n = hashlib.sha256(), 0
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        p.wait()
        return "sha256:" + h.hexdigest(), n, p.returncode

    def first_bytes(self, url):
        """GET url: seconds to the response headers, to the first body byte,
        and to the last; status and body size."""
        import http.client
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        t0 = time.perf_counter()
        conn.request("GET", u.path, headers={"Accept": ACCEPT})
        resp = conn.getresponse()
        t_head = time.perf_counter() - t0
        first = resp.read(1)
        t_body = time.perf_counter() - t0
        n = len(first)
        buf = bytearray(1 << 20)
        while k := resp.readinto(buf):
            n += k
        t_end = time.perf_counter() - t0
        conn.close()
        return {"code": resp.status, "size": n, "head_ms": t_head * 1e3, "ttfb_ms": t_body * 1e3, "time": t_end}

    def get(self, url, accept=True):
        req = urllib.request.Request(url, headers={"Accept": ACCEPT} if accept else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()

    def skopeo_pull(self, srv, repo):
        dest = Path(tempfile.mkdtemp(dir=self.work / "pulls"))
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                srv.pull_ref(repo, "latest"), f"dir:{dest}"]
        side0 = cpu_seconds(srv.side_pids)
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        dt = time.perf_counter() - t0
        # What the S3 server and Redis spent during the pull, for reading
        # cold figures on cores they share.
        self.last_side_cpu = cpu_seconds(srv.side_pids) - side0
        shutil.rmtree(dest, ignore_errors=True)
        if r.returncode:
            self.error(f"skopeo pull {srv.key} {repo}: {r.stderr.strip()[-500:]}")
            return None
        return dt

    def wrk(self, urls, conns, seconds):
        """wrk against each URL at once (connections split evenly); requests/s
        summed, latency percentiles the worst of them."""
        threads = max(1, 2 // len(urls))
        procs = [subprocess.Popen(["wrk", f"-t{threads}", f"-c{conns // len(urls)}", f"-d{seconds}s",
                                   "--latency", "-H", f"Accept: {ACCEPT}", u],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for u in urls]
        res = {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "non2xx": 0, "socket_errors": 0, "requests": 0}
        unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 60)
            m = re.search(r"Requests/sec:\s+([\d.]+)", out)
            if not m:
                self.error(f"wrk output unparsed: {out[-500:]}")
                return None
            res["rps"] += float(m.group(1))
            for pct, val, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
                key = f"p{pct}_ms"
                res[key] = max(res[key], float(val) * unit[u])
            m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            res["non2xx"] += int(m.group(1)) if m else 0
            m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
            res["socket_errors"] += sum(map(int, m.groups())) if m else 0
            m = re.search(r"(\d+) requests in", out)
            res["requests"] += int(m.group(1)) if m else 0
        return res

    # ---------------------------------------------------------- upstream log

    def up_mark(self):
        return self.up_log.stat().st_size

    def up_requests(self, mark, settle=1.0, limit=120):
        """Upstream requests logged since mark, once the log has been quiet
        for `settle` seconds (a proxy may still be fetching after its
        clients are done)."""
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            size = self.up_mark()
            if size == last:
                break
            last = size
            time.sleep(settle)
        with open(self.up_log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        out = []
        for m in re.finditer(r'"(GET|HEAD) /v2/(\S+?)/(blobs|manifests)/([^\s?]+)\S* HTTP/[\d.]+" (\d{3})', text):
            out.append({"method": m.group(1), "repo": m.group(2), "kind": m.group(3),
                        "ref": m.group(4), "status": int(m.group(5))})
        return out

    # ---------------------------------------------------------- sections

    def warm_servers(self):
        """Long-lived warm instances of every server."""
        log("starting warm servers (pier-fs, pier-s3 x2, dist) and warming them with skopeo pulls")
        self.w = {"direct": self.direct(), "pier-fs": self.pier_fs(), "pier-s3": self.pier_s3(),
                  "dist": self.dist()}
        for key in ("pier-fs", "pier-s3", "dist"):
            srv = self.w[key]
            for repo in ("big", "many", "alpine"):
                if self.skopeo_pull(srv, repo) is None:
                    raise RuntimeError(f"warming {key} with {repo} failed")
        hexd = self.big.split(":")[1]
        blob_file = self.w["pier-fs"].data / "blobs" / "sha256" / hexd[:2] / hexd
        if not blob_file.exists():
            raise RuntimeError(f"expected Pier's blob file at {blob_file}")
        self.w["nginx"] = self.nginx(blob_file)
        self.w["s3"] = self.s3_direct(self.w["pier-s3"].ns)
        # The same bucket and metadata, read without local copies.
        self.w["pier-s3-bucket"] = self.pier_s3(self.w["pier-s3"].ns, local=False)
        # Pier on S3 uploads the blob after its clients have it: wait for
        # the upload, so that it weighs on no measurement.
        s3 = self.w["s3"]
        deadline = time.monotonic() + 300
        while True:
            code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-I", *s3.curl_args,
                                   s3.blob_url(0, "big", self.big)], capture_output=True, text=True).stdout
            if code == "200":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the big blob never reached S3 (HEAD answers {code})")
            time.sleep(0.5)
        # every server, every replica serves the right bytes
        for key, srv in self.w.items():
            for i in range(len(srv.bases)):
                url = srv.blob_url(i, "big", self.big)
                digest, n, rc = self.sha256_of(url, srv.curl_args)
                if digest != self.big or n != self.big_size:
                    raise RuntimeError(f"{key} replica {i}: {url} gave {n} bytes {digest} (curl rc {rc})")
        log("all servers serve the big blob with the right digest")

    def bench_warm_blobs(self):
        order = ["nginx", "direct", "dist", "pier-fs", "pier-s3", "pier-s3-bucket", "s3"]
        conc = [1, 2, 4, 8]
        log(f"warm blob throughput: {self.args.runs} runs x clients {conc} x {len(order)} servers")
        for run in range(self.args.runs):
            for c in conc:
                for key in order:
                    srv = self.w[key]
                    srv.check_alive()
                    pids = srv.pids() if srv.procs else [self.weed_pid]
                    side = srv.side_pids
                    c0, s0 = cpu_seconds(pids), cpu_seconds(side)
                    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    wall, xfers, failed = self.curl_batch(
                        [[srv.blob_url(i, "big", self.big)] for i in range(c)], srv.curl_args)
                    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    c1, s1 = cpu_seconds(pids), cpu_seconds(side)
                    client = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
                    good = sum(x["size"] for x in xfers if x["code"] == 200 and x["size"] == self.big_size)
                    bad = c - sum(1 for x in xfers if x["code"] == 200 and x["size"] == self.big_size)
                    if bad or failed:
                        self.error(f"warm {key} c={c}: {bad} bad transfers, {failed} curl failures: {xfers}")
                    rec = {"server": key, "clients": c, "run": run, "wall": wall, "bytes": good,
                           "mibps": good / MiB / wall,
                           "cpu_s": c1 - c0, "cpu_per_gib": (c1 - c0) / (good / GiB) if good else None,
                           "side_cpu_per_gib": (s1 - s0) / (good / GiB) if good and side else None,
                           "client_cpu_per_gib": client / (good / GiB) if good else None,
                           "bad": bad + failed}
                    self.res["warm"].append(rec)
                log(f"  run {run + 1} c={c}: " + ", ".join(
                    f"{r['server']} {r['mibps']:.0f} MiB/s {r['cpu_per_gib'] or 0:.2f} cpu-s/GiB"
                    for r in self.res["warm"] if r["run"] == run and r["clients"] == c))

    def bench_manifests(self):
        order = ["nginx", "direct", "dist", "pier-fs", "pier-s3"]
        plan = [(8, 1), (32, 1), (64, self.args.wrk_runs)]
        # The ceiling: nginx serving the same manifest bytes as a static file.
        ngx = self.w["nginx"]
        st, index = self.get(self.w["pier-fs"].manifest_url(0, "alpine", "latest"))
        assert st == 200, st
        static = self.work / ngx.procs[0].name / "www" / "v2" / "alpine" / "manifests" / "latest"
        static.parent.mkdir(parents=True, exist_ok=True)
        static.write_bytes(index)
        log(f"warm manifest by tag: wrk {self.args.wrk_seconds}s, connections 8/32 x1, 64 x{self.args.wrk_runs}")
        for key in order:  # warm the tag, check the answer
            srv = self.w[key]
            for i in range(len(srv.bases)):
                st, body = self.get(srv.manifest_url(i, "alpine", "latest"))
                assert st == 200 and b"manifests" in body, (key, st, body[:200])
        for conns, runs in plan:
            for run in range(runs):
                for key in order:
                    srv = self.w[key]
                    srv.check_alive()
                    urls = [srv.manifest_url(i, "alpine", "latest") for i in range(len(srv.bases))]
                    r = self.wrk(urls, conns, self.args.wrk_seconds)
                    if r is None:
                        continue
                    if r["non2xx"] or r["socket_errors"]:
                        self.error(f"wrk {key} c={conns}: {r['non2xx']} non-2xx, {r['socket_errors']} socket errors")
                    r.update({"server": key, "conns": conns, "run": run})
                    self.res["manifest"].append(r)
                log(f"  c={conns} run {run + 1}: " + ", ".join(
                    f"{r['server']} {r['rps']:.0f} rps p99 {r['p99_ms']:.2f} ms"
                    for r in self.res["manifest"] if r["conns"] == conns and r["run"] == run))

    def bench_rss(self):
        """Fresh process on a warm cache: idle RSS, then VmHWM while 32
        clients stream the big blob."""
        log("RSS: fresh processes on warm caches, 32 clients streaming the big blob")
        fs, s3, dist, ngx = self.w["pier-fs"], self.w["pier-s3"], self.w["dist"], self.w["nginx"]
        blob_file = self.work / ngx.procs[0].name / "www" / "blob"
        restarts = [
            ("pier-fs", lambda: self.pier_fs(fs.data)),
            ("pier-s3", lambda: self.pier_s3(s3.ns)),
            ("dist", lambda: self.dist(dist.root)),
            ("nginx", lambda: self.nginx(blob_file)),
        ]
        for key, start in restarts:
            self.stop(self.w[key])
            srv = start()
            self.w[key] = srv
            time.sleep(0.5)
            idle_start = srv.rss("VmRSS")
            for i in range(len(srv.bases)):  # one warm-up pull's worth of requests
                if key != "nginx":
                    self.get(srv.manifest_url(i, "big", "latest"))
                self.curl_batch([[srv.blob_url(i, "big", self.big)]])
            time.sleep(0.5)
            idle_warm = srv.rss("VmRSS")
            wall, xfers, failed = self.curl_batch([[srv.blob_url(i, "big", self.big)] for i in range(32)])
            bad = 32 - sum(1 for x in xfers if x["code"] == 200 and x["size"] == self.big_size)
            if bad or failed:
                self.error(f"rss {key}: {bad} bad transfers, {failed} curl failures")
            hwm = srv.rss("VmHWM")
            rec = {"server": key, "idle_start_mib": idle_start, "idle_warm_mib": idle_warm,
                   "peak_mib": hwm, "wall": wall, "mibps": sum(x["size"] for x in xfers) / MiB / wall}
            self.res["rss"].append(rec)
            log(f"  {key}: idle {[round(x, 1) for x in idle_start]} MiB at start, "
                f"{[round(x, 1) for x in idle_warm]} after warm-up, peak {[round(x, 1) for x in hwm]} MiB "
                "(per replica/process tree)")

    def bench_cold(self):
        kinds = [("direct", self.direct), ("nginx-cache", self.nginx_cache), ("pier-fs", self.pier_fs),
                 ("pier-s3", self.pier_s3), ("dist", self.dist)]
        log(f"cold pulls and TTFB: {self.args.cold_runs} runs x {len(kinds)} servers (fresh state each)")
        for run in range(self.args.cold_runs):
            for key, start in kinds:
                # Each figure from its own fresh state, so that nothing left
                # over from another (Pier on S3 still uploading a blob it
                # has served) weighs on it.
                srv = start()
                many = self.skopeo_pull(srv, "many")
                side_many = self.last_side_cpu
                srv.check_alive()
                self.retire(srv)
                # the big blob by curl: its manifest first, as a client
                # fetches it, then the blob, timed
                srv = start()
                t0 = time.perf_counter()
                self.get(srv.manifest_url(0, "big", "latest"))
                t_manifest = time.perf_counter() - t0
                x = self.first_bytes(srv.blob_url(0, "big", self.big))
                if x["code"] != 200 or x["size"] != self.big_size:
                    self.error(f"cold blob {key}: {x}")
                srv.check_alive()
                self.retire(srv)
                srv = start()
                big = self.skopeo_pull(srv, "big")
                side_big = self.last_side_cpu
                srv.check_alive()
                self.retire(srv)
                self.res["cold_ttfb"].append({"server": key, "run": run, "ttfb_ms": x["ttfb_ms"],
                                              "head_ms": x["head_ms"], "blob_s": x["time"],
                                              "manifest_ms": t_manifest * 1e3})
                self.res["cold_pull"].append({"server": key, "run": run, "big_s": big, "many_s": many,
                                              "side_cpu_big": side_big, "side_cpu_many": side_many})
                log(f"  run {run + 1} {key}: headers {x['head_ms']:.1f} ms, first body byte {x['ttfb_ms']:.1f} ms, "
                    f"blob {x['time']:.2f} s, "
                    f"pull big {big if big is None else round(big, 2)} s, many {many if many is None else round(many, 2)} s")

    def bench_cold32(self):
        kinds = [("pier-fs", self.pier_fs), ("pier-s3", self.pier_s3), ("dist", self.dist),
                 ("nginx-cache", self.nginx_cache)]
        log(f"32 concurrent cold clients: upstream GETs per blob, {self.args.cold32_runs} runs "
            "(fresh state each)")
        for run in range(self.args.cold32_runs):
            for key, start in kinds:
                srv = start()
                for repo in ("big", "many"):  # one client fetches the manifests first
                    self.get(srv.manifest_url(0, repo, "latest"))
                rec = {"server": key, "run": run, "replicas": [p.name for p in srv.procs]}
                for phase, blobs in (("big", [self.big]), ("many", self.many_blobs)):
                    mark = self.up_mark()
                    wall, xfers, failed = self.curl_batch(
                        [[srv.blob_url(i, phase, d) for d in blobs] for i in range(32)])
                    sizes = {self.big: self.big_size} if phase == "big" else self.many_sizes
                    want = 32 * len(blobs)
                    good = sum(1 for x in xfers if x["code"] == 200 and x["size"] in sizes.values())
                    if good != want or failed:
                        self.error(f"cold32 {key} {phase}: {good}/{want} good transfers, {failed} curl failures")
                    if phase == "big":
                        rec["peak_mib"] = srv.rss("VmHWM")
                    reqs = self.up_requests(mark)
                    gets = {d: 0 for d in blobs}
                    heads = {d: 0 for d in blobs}
                    for r in reqs:
                        if r["kind"] == "blobs" and r["ref"] in gets:
                            (gets if r["method"] == "GET" else heads)[r["ref"]] += 1
                    rec[phase] = {"wall": wall, "good": good, "want": want, "gets": gets,
                                  "heads_total": sum(heads.values()),
                                  "gets_max": max(gets.values()), "gets_min": min(gets.values()),
                                  "gets_mean": sum(gets.values()) / len(gets)}
                    if key.startswith("pier") and rec[phase]["gets_max"] != 1:
                        self.res.setdefault("anomalies", []).append(
                            f"cold32 {key} run {run + 1} {phase}: upstream GETs "
                            f"{ {d: n for d, n in gets.items() if n != 1} } (replicas {rec['replicas']})")
                srv.check_alive()
                self.retire(srv)
                self.res["cold32"].append(rec)
                log(f"  run {run + 1} {key}: big blob {rec['big']['gets_max']} upstream GETs "
                    f"({rec['big']['wall']:.1f} s), many: max {rec['many']['gets_max']} "
                    f"mean {rec['many']['gets_mean']:.2f} GETs per blob")

    # ---------------------------------------------------------- logs

    def scan_logs(self):
        out = {}
        for f in sorted((self.work / "logs").glob("pier-*.log")):
            text = ANSI.sub("", f.read_text(errors="replace"))
            lines = [ln for ln in text.splitlines()
                     if re.search(r"\b(WARN|ERROR)\b|panicked", ln)]
            if lines:
                out[f.name] = {"count": len(lines), "sample": lines[:8]}
        self.res["pier_log_warnings"] = out
        if out:
            log(f"Pier logged warnings/errors in {len(out)} files: "
                + ", ".join(f"{k} ({v['count']})" for k, v in out.items()))

    def keep_logs(self):
        """Logs into OUT/logs; a big log keeps its first 100 lines and every
        line that is not a routine access-log line."""
        dest = Path(self.args.out) / "logs"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        routine = re.compile(r'INFO pier::api: request .* status=2\d\d|"(GET|HEAD) /v2/\S*/manifests/\S* HTTP/1.1" [23]\d\d'
                             r'|level=info msg="response completed"|msg="(authorizing|response) ')
        for f in (self.work / "logs").glob("*.log"):
            text = ANSI.sub("", f.read_text(errors="replace"))
            if len(text) > 2 * MiB:
                lines = text.splitlines()
                kept = [ln for ln in lines[100:] if not routine.search(ln)]
                text = "\n".join(lines[:100] + [f"... ({len(lines) - 100 - len(kept)} routine lines left out)"]
                                 + kept[-20000:]) + "\n"
            (dest / f.name).write_text(text)

    def section(self, name):
        self.res["meta"].setdefault("loadavg", []).append((name, os.getloadavg()[0]))

    def run(self):
        t0 = time.monotonic()
        self.meta()
        self.gen_images()
        self.start_backends()
        only = set(self.args.only.split(",")) if self.args.only else None
        warm = [("warm blobs", self.bench_warm_blobs), ("manifests", self.bench_manifests),
                 ("rss", self.bench_rss)]
        cold = [("cold", self.bench_cold), ("cold32", self.bench_cold32)]
        if only is None or only & {name for name, _ in warm}:
            self.warm_servers()
        for name, step in warm:
            if only is None or name in only:
                self.section(name)
                step()
        for key in list(self.w):
            self.stop(self.w[key])
        for name, step in cold:
            if only is None or name in only:
                self.section(name)
                step()
        self.section("end")
        self.res["meta"]["loadavg_end"] = os.getloadavg()
        self.res["meta"]["seconds"] = time.monotonic() - t0

    def cleanup(self):
        self.procs.stop_all()
        self.stop_backends()
        self.res["early_exits"] = self.procs.early_exits
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")


# ------------------------------------------------------------------ report

def summarize(res):
    """Medians (and min-max) per server and setting."""
    s = {"warm": {}, "manifest": {}, "cold": {}, "cold32": {}, "rss": {}}
    for r in res["warm"]:
        d = s["warm"].setdefault(r["server"], {}).setdefault(r["clients"],
                                                              {"mibps": [], "cpu": [], "side": [], "client": []})
        d["mibps"].append(r["mibps"])
        d["client"].append(r.get("client_cpu_per_gib"))
        d["cpu"].append(r["cpu_per_gib"])
        d["side"].append(r["side_cpu_per_gib"])
    for srv in s["warm"].values():
        for c, d in srv.items():
            srv[c] = {"n": len(d["mibps"]), "mibps": median(d["mibps"]), "mibps_range": spread(d["mibps"]),
                      "cpu_per_gib": median(d["cpu"]), "cpu_range": spread(d["cpu"]),
                      "side_cpu_per_gib": median(d["side"]), "client_cpu_per_gib": median(d["client"])}
    for r in res["manifest"]:
        d = s["manifest"].setdefault(r["server"], {}).setdefault(r["conns"], {"rps": [], "p50": [], "p99": []})
        d["rps"].append(r["rps"])
        d["p50"].append(r["p50_ms"])
        d["p99"].append(r["p99_ms"])
    for srv in s["manifest"].values():
        for c, d in srv.items():
            srv[c] = {"n": len(d["rps"]), "rps": median(d["rps"]), "rps_range": spread(d["rps"]),
                      "p50_ms": median(d["p50"]), "p99_ms": median(d["p99"]), "p99_range": spread(d["p99"])}
    for r in res["cold_pull"]:
        d = s["cold"].setdefault(r["server"], {"big": [], "many": [], "ttfb": [], "head": [], "blob": []})
        d["big"].append(r["big_s"])
        d["many"].append(r["many_s"])
        d.setdefault("side_big", []).append(r.get("side_cpu_big"))
        d.setdefault("side_many", []).append(r.get("side_cpu_many"))
    for r in res["cold_ttfb"]:
        d = s["cold"].setdefault(r["server"], {"big": [], "many": [], "ttfb": [], "head": [], "blob": []})
        d["ttfb"].append(r["ttfb_ms"])
        d["head"].append(r["head_ms"])
        d["blob"].append(r["blob_s"])
    for k, d in s["cold"].items():
        s["cold"][k] = {"n": len(d["big"]), "big_s": median(d["big"]), "big_range": spread(d["big"]),
                        "many_s": median(d["many"]), "many_range": spread(d["many"]),
                        "ttfb_ms": median(d["ttfb"]), "ttfb_range": spread(d["ttfb"]),
                        "head_ms": median(d["head"]),
                        "blob_s": median(d["blob"]),
                        "side_big": median(d.get("side_big", [])),
                        "side_many": median(d.get("side_many", []))}
    for r in res["cold32"]:
        d = s["cold32"].setdefault(r["server"], {"n": 0, "big_max": 0, "big_min": 1 << 30, "many_max": 0,
                                                 "many_min": 1 << 30, "many_means": [], "extra_gets": 0,
                                                 "peak_mib": []})
        d["n"] += 1
        d["big_max"] = max(d["big_max"], r["big"]["gets_max"])
        d["big_min"] = min(d["big_min"], r["big"]["gets_min"])
        d["many_max"] = max(d["many_max"], r["many"]["gets_max"])
        d["many_min"] = min(d["many_min"], r["many"]["gets_min"])
        d["many_means"].append(r["many"]["gets_mean"])
        d["extra_gets"] += sum(max(0, n - 1) for ph in ("big", "many") for n in r[ph]["gets"].values())
        d["peak_mib"] = [max(a, b) for a, b in zip(d["peak_mib"], r["peak_mib"])] or list(r["peak_mib"])
    for d in s["cold32"].values():
        d["many_mean"] = statistics.mean(d.pop("many_means"))
    for r in res["rss"]:
        s["rss"][r["server"]] = r
    return s


def fmt(x, nd=1):
    if x is None:
        return "–"
    return f"{x:.{nd}f}"


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{nd}f}×"


def total_cpu(w, key, clients):
    """CPU s/GiB of the server, its S3 + Redis and its curl clients: loopback
    TCP work lands on either side, so this is the steadier figure."""
    d = w.get(key, {}).get(clients)
    if d is None:
        return None
    return sum(d.get(f) or 0 for f in ("cpu_per_gib", "side_cpu_per_gib", "client_cpu_per_gib"))


def targets(s):
    """(target, figure, met) rows for Pier fs and S3."""
    rows = []
    w, m, c, c32, rss = s["warm"], s["manifest"], s["cold"], s["cold32"], s["rss"]

    def g(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d
    for pier in ("pier-fs", "pier-s3"):
        for cl in (1, 8):
            a, b = g(w, pier, cl, "mibps"), g(w, "nginx", cl, "mibps")
            rows.append((f"{pier}: warm throughput ≥ 0.95× nginx, {cl} client(s)",
                         f"{fmt(a, 0)} vs {fmt(b, 0)} MiB/s = {ratio(a, b)}", a is not None and b and a / b >= 0.95))
    for cl in (1, 8):
        a, b = g(w, "pier-s3-bucket", cl, "mibps"), g(w, "s3", cl, "mibps")
        rows.append((f"pier-s3-bucket (no local cache): warm throughput against a direct S3 GET, {cl} client(s) (report)",
                     f"{fmt(a, 0)} vs {fmt(b, 0)} MiB/s = {ratio(a, b)}", None))
    for cl in (1, 8):
        a, b, d = g(w, "pier-fs", cl, "cpu_per_gib"), g(w, "nginx", cl, "cpu_per_gib"), g(w, "dist", cl, "cpu_per_gib")
        rows.append((f"pier-fs: CPU/GiB ≤ 1.5× nginx, {cl} client(s)",
                     f"{fmt(a, 3)} vs {fmt(b, 3)} s/GiB = {ratio(a, b)}", a is not None and b and a / b <= 1.5))
        rows.append((f"pier-fs: CPU/GiB ≤ 0.5× distribution proxy, {cl} client(s)",
                     f"{fmt(a, 3)} vs {fmt(d, 3)} s/GiB = {ratio(a, d)}", a is not None and d and a / d <= 0.5))
        a, b = total_cpu(w, "pier-fs", cl), total_cpu(w, "nginx", cl)
        rows.append((f"pier-fs: server + curl clients' CPU/GiB against nginx's, {cl} client(s) (report: "
                     "loopback TCP work lands on either side)", f"{fmt(a, 3)} vs {fmt(b, 3)} s/GiB = {ratio(a, b)}", None))
        a, side, s3 = (g(w, "pier-s3-bucket", cl, "cpu_per_gib"), g(w, "pier-s3-bucket", cl, "side_cpu_per_gib"),
                       g(w, "s3", cl, "cpu_per_gib"))
        rows.append((f"pier-s3-bucket (no local cache): CPU/GiB against a direct S3 GET, {cl} client(s) (report)",
                     f"Pier {fmt(a, 3)} (+ S3/Redis {fmt(side, 3)}) vs S3 server alone {fmt(s3, 3)} s/GiB "
                     f"= {ratio(a, s3)} (Pier only)", None))
    d = g(c, "direct", "big_s")
    for what, key in (("256 MiB image", "big_s"), ("20-layer image", "many_s")):
        a, b = g(c, "nginx-cache", key), g(c, "direct", key)
        rows.append((f"nginx caching proxy: cold skopeo pull against direct, {what} (report: what a second "
                     "process on the path costs on these cores)", f"{fmt(a, 2)} vs {fmt(b, 2)} s = {ratio(a, b)}", None))
    for pier in ("pier-fs", "pier-s3"):
        a = g(c, pier, "big_s")
        rows.append((f"{pier}: cold skopeo pull ≤ 1.1× direct (256 MiB image)",
                     f"{fmt(a, 2)} vs {fmt(d, 2)} s = {ratio(a, d)}", a is not None and d and a / d <= 1.1))
        a2, d2 = g(c, pier, "many_s"), g(c, "direct", "many_s")
        rows.append((f"{pier}: cold skopeo pull ≤ 1.1× direct (20-layer image)",
                     f"{fmt(a2, 2)} vs {fmt(d2, 2)} s = {ratio(a2, d2)}", a2 is not None and d2 and a2 / d2 <= 1.1))
        t, td = g(c, pier, "ttfb_ms"), g(c, "direct", "ttfb_ms")
        rows.append((f"{pier}: cold TTFB (first body byte) within 10 ms of upstream's",
                     f"{fmt(t, 1)} vs {fmt(td, 1)} ms ({fmt(t - td if t is not None and td is not None else None, 1)} ms)",
                     t is not None and td is not None and t - td <= 10))
        r = c32.get(pier)
        if r:
            ok = r["big_max"] == r["big_min"] == r["many_max"] == r["many_min"] == 1
            rows.append((f"{pier}: exactly 1 upstream GET per blob, 32 cold clients",
                         f"{r['n']} runs: 256 MiB blob {r['big_min']}–{r['big_max']}; 21 small blobs "
                         f"{r['many_min']}–{r['many_max']} (extra GETs in all: {r['extra_gets']})", ok))
    dr = g(c32, "dist", "big_max")
    rows.append(("distribution proxy, 32 cold clients (for comparison)", f"big: {dr} upstream GETs", None))
    for pier in ("pier-fs", "pier-s3"):
        a, d = g(m, pier, 64, "rps"), g(m, "dist", 64, "rps")
        rows.append((f"{pier}: manifest-by-tag ≥ 3× distribution proxy rps (64 conns)",
                     f"{fmt(a, 0)} vs {fmt(d, 0)} rps = {ratio(a, d, 1)}", a is not None and d and a / d >= 3))
        p = g(m, pier, 64, "p99_ms")
        rows.append((f"{pier}: manifest p99 ≤ 5 ms at 64 conns", f"{fmt(p, 2)} ms", p is not None and p <= 5))
    for pier in ("pier-fs", "pier-s3"):
        r = rss.get(pier)
        if r:
            rows.append((f"{pier}: peak RSS ≤ 64 MiB, 32 clients streaming 256 MiB",
                         " / ".join(f"{x:.1f}" for x in r["peak_mib"]) + " MiB (per replica)",
                         max(r["peak_mib"]) <= 64))
            rows.append((f"{pier}: idle RSS ≤ 20 MiB",
                         " / ".join(f"{x:.1f}" for x in r["idle_start_mib"]) + " MiB at start, "
                         + " / ".join(f"{x:.1f}" for x in r["idle_warm_mib"]) + " MiB after one pull",
                         max(r["idle_warm_mib"]) <= 20))
    return rows


def compact(res, s):
    """One table for the README: each figure with its ratio against the peer
    the issue's targets name."""
    w, c, c32, m, rss = s["warm"], s["cold"], s["cold32"], s["manifest"], s["rss"]

    def g(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def cell(v, nd, ref=None, rnd=2):
        if v is None:
            return "–"
        return fmt(v, nd) + (f" ({ratio(v, ref, rnd)})" if ref is not None and ref != v else "")
    keys = ("nginx", "direct", "nginx-cache", "dist", "pier-fs", "pier-s3", "s3")
    L = ["| | " + " | ".join(LABELS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]

    def row(title, f):
        L.append(f"| {title} | " + " | ".join(f(k) for k in keys) + " |")
    for cl in (1, 8):
        row(f"warm blob MiB/s, {cl} client{'s' if cl > 1 else ''} (× nginx)",
            lambda k: cell(g(w, k, cl, "mibps"), 0, g(w, "nginx", cl, "mibps")))
    for cl in (1, 8):
        row(f"server CPU s/GiB, {cl} client{'s' if cl > 1 else ''} (× nginx)",
            lambda k: cell(g(w, k, cl, "cpu_per_gib"), 2, g(w, "nginx", cl, "cpu_per_gib")))
    row("server + curl CPU s/GiB, 1 client (× nginx)",
        lambda k: cell(total_cpu(w, k, 1), 2, total_cpu(w, "nginx", 1)))
    row("cold pull, 256 MiB image, s (× direct)",
        lambda k: cell(g(c, k, "big_s"), 2, g(c, "direct", "big_s")))
    row("cold pull, 20-layer image, s (× direct)",
        lambda k: cell(g(c, k, "many_s"), 2, g(c, "direct", "many_s")))
    row("cold blob TTFB ms (first body byte)", lambda k: fmt(g(c, k, "ttfb_ms"), 1) if k in c else "–")
    row("upstream GETs per blob, 32 cold clients (256 MiB / 21 small blobs, max over runs)",
        lambda k: f"{c32[k]['big_max']} / {c32[k]['many_max']}" if k in c32 else "–")
    row("peak RSS MiB, 32 cold clients (per replica)",
        lambda k: " / ".join(f"{x:.0f}" for x in c32[k]["peak_mib"]) if k in c32 else "–")
    row("manifest by tag, rps @64 conns (× dist)", lambda k: cell(g(m, k, 64, "rps"), 0, g(m, "dist", 64, "rps"), 1))
    row("manifest by tag, p99 ms @64 conns", lambda k: fmt(g(m, k, 64, "p99_ms"), 1) if k in m else "–")
    row("RSS MiB: idle / peak, 32 clients × 256 MiB",
        lambda k: f"{max(rss[k]['idle_warm_mib']):.0f} / {max(rss[k]['peak_mib']):.0f}" if k in rss else "–")
    return "\n".join(L) + "\n"


def markdown(res, s):
    meta = res["meta"]
    L = []
    order = ["nginx", "direct", "dist", "pier-fs", "pier-s3", "pier-s3-bucket", "s3"]
    w = s["warm"]
    n = max((d["n"] for srv in w.values() for d in srv.values()), default=0)
    loads = ", ".join(f"{name} {load:.1f}" for name, load in meta.get("loadavg", []))
    L.append(f"Medians of {n} runs (warm blobs), {meta['cold_runs']} (cold pulls, TTFB), "
             f"{meta['wrk_runs']} × {meta['wrk_seconds']} s wrk runs (manifests at 64 connections; 1 run at 8 and 32), "
             f"{meta['cold32_runs']} (32 cold clients). {meta['cpus']} cores shared with other work: 1-minute load "
             f"average at start {meta['loadavg_start'][0]:.1f}; at each section: {loads}. "
             f"Pier {meta['pier_git']}; run took {meta.get('seconds', 0) / 60:.1f} min.\n")
    L.append("**Summary** (medians; ratios against nginx, upstream direct or distribution's proxy as noted; "
             "Pier S3 = two replicas, clients spread across both, figures summed; RSS per replica)\n")
    L.append(compact(res, s))
    L.append("**Warm blob** (256 MiB blob, curl to /dev/null; CPU = the server's utime+stime per GiB served)\n")
    L.append("| server | 1 client MiB/s | 8 clients MiB/s | × nginx (1 / 8) | CPU s/GiB (1 / 8) | CPU × nginx (8) "
             "| CPU × dist (8) | curl clients' CPU s/GiB (1 / 8) | server + clients s/GiB (8) | MiB/s min–max (8) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for k in order:
        if k not in w:
            continue
        a1, a8 = w[k].get(1, {}), w[k].get(8, {})
        n1, n8 = w.get("nginx", {}).get(1, {}), w.get("nginx", {}).get(8, {})
        d8 = w.get("dist", {}).get(8, {})
        cpu = f"{fmt(a1.get('cpu_per_gib'), 3)} / {fmt(a8.get('cpu_per_gib'), 3)}"
        if k in ("pier-s3", "pier-s3-bucket"):
            cpu += f" (+{fmt(a8.get('side_cpu_per_gib'), 3)} S3+Redis)"
        L.append(f"| {LABELS[k]} | {fmt(a1.get('mibps'), 0)} | {fmt(a8.get('mibps'), 0)} | "
                 f"{ratio(a1.get('mibps'), n1.get('mibps'))} / {ratio(a8.get('mibps'), n8.get('mibps'))} | {cpu} | "
                 f"{ratio(a8.get('cpu_per_gib'), n8.get('cpu_per_gib'))} | {ratio(a8.get('cpu_per_gib'), d8.get('cpu_per_gib'))} | "
                 f"{fmt(a1.get('client_cpu_per_gib'), 2)} / {fmt(a8.get('client_cpu_per_gib'), 2)} | "
                 f"{fmt((a8.get('cpu_per_gib') or 0) + (a8.get('side_cpu_per_gib') or 0) + (a8.get('client_cpu_per_gib') or 0), 2)} | "
                 f"{fmt((a8.get('mibps_range') or (None,))[0], 0)}–{fmt((a8.get('mibps_range') or (None, None))[1], 0)} |")
    c = s["cold"]
    L.append("\n**Cold** (fresh cache each run; skopeo copy to dir:, one client; TTFB = first body byte of "
             "the 256 MiB blob, GET right after its manifest; headers = response headers)\n")
    L.append("| server | pull 256 MiB image s | × direct | pull 20-layer image s | × direct | blob headers ms "
             "| blob TTFB ms | TTFB − direct ms | 256 MiB blob s | S3 + Redis CPU s during the pulls (256 MiB / 20-layer) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    dc = c.get("direct", {})
    for k in ("direct", "nginx-cache", "dist", "pier-fs", "pier-s3"):
        if k not in c:
            continue
        x = c[k]
        dt = None if x["ttfb_ms"] is None or dc.get("ttfb_ms") is None else x["ttfb_ms"] - dc["ttfb_ms"]
        L.append(f"| {LABELS[k]} | {fmt(x['big_s'], 2)} | {ratio(x['big_s'], dc.get('big_s'))} | "
                 f"{fmt(x['many_s'], 2)} | {ratio(x['many_s'], dc.get('many_s'))} | {fmt(x['head_ms'], 1)} | "
                 f"{fmt(x['ttfb_ms'], 1)} | {'+' if dt is not None and dt >= 0 else ''}{fmt(dt, 1)} | "
                 f"{fmt(x['blob_s'], 2)} | "
                 f"{'–' if k != 'pier-s3' else fmt(x.get('side_big'), 2) + ' / ' + fmt(x.get('side_many'), 2)} |")
    L.append("\n**32 concurrent cold clients** (upstream GETs per blob, from the upstream's access log)\n")
    L.append("| server | runs | 256 MiB blob: GETs | 20-layer image (21 blobs): min–max / mean GETs per blob "
             "| extra GETs over all runs | peak RSS MiB |")
    L.append("|---|---|---|---|---|---|")
    for k in ("nginx-cache", "dist", "pier-fs", "pier-s3"):
        r = s["cold32"].get(k)
        if r:
            L.append(f"| {LABELS[k]} | {r['n']} | {r['big_min']}–{r['big_max']} | {r['many_min']}–{r['many_max']} / "
                     f"{r['many_mean']:.2f} | {r['extra_gets']} | " + " / ".join(f"{x:.1f}" for x in r["peak_mib"]) + " |")
    m = s["manifest"]
    L.append("\n**Warm manifest by tag** (wrk, 2 threads, multi-arch index `alpine:latest`; "
             "nginx: the same bytes as a static file, the ceiling on these cores; "
             "Pier S3: two wrk at 32 connections, one per replica, rps summed, latency the worse)\n")
    L.append("| server | rps @64 | × dist | p50 ms @64 | p99 ms @64 | p99 ms @8 / @32 |")
    L.append("|---|---|---|---|---|---|")
    dm = m.get("dist", {}).get(64, {})
    for k in ("nginx", "direct", "dist", "pier-fs", "pier-s3"):
        if k not in m:
            continue
        x = m[k].get(64, {})
        L.append(f"| {LABELS[k]} | {fmt(x.get('rps'), 0)} | {ratio(x.get('rps'), dm.get('rps'), 1)} | "
                 f"{fmt(x.get('p50_ms'), 2)} | {fmt(x.get('p99_ms'), 2)} | "
                 f"{fmt(m[k].get(8, {}).get('p99_ms'), 2)} / {fmt(m[k].get(32, {}).get('p99_ms'), 2)} |")
    L.append("\n**Memory** (fresh process on a warm cache; peak = VmHWM while 32 clients stream the 256 MiB blob; "
             "per replica, nginx = master + workers)\n")
    L.append("| server | idle RSS at start MiB | idle after one pull MiB | peak RSS MiB | 32-client MiB/s |")
    L.append("|---|---|---|---|---|")
    for k in ("nginx", "dist", "pier-fs", "pier-s3"):
        r = s["rss"].get(k)
        if r:
            j = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
            L.append(f"| {LABELS[k]} | {j(r['idle_start_mib'])} | {j(r['idle_warm_mib'])} | {j(r['peak_mib'])} | "
                     f"{r['mibps']:.0f} |")
    L.append("\n**Targets** (issue 4)\n")
    L.append("| target | figures | met |")
    L.append("|---|---|---|")
    for t, fig, ok in targets(s):
        L.append(f"| {t} | {fig} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    if res.get("anomalies"):
        L.append("\n**Anomalies**\n")
        L.extend(f"- {e[:600]}" for e in res["anomalies"])
    if res["errors"]:
        L.append("\n**Errors during the run**\n")
        L.extend(f"- {e[:400]}" for e in res["errors"])
    if res.get("early_exits"):
        L.append("\n**Processes that exited on their own**\n")
        L.extend(f"- {e}" for e in res["early_exits"])
    return "\n".join(L) + "\n"


def plot(s, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, r, b) = plt.subplots(1, 3, figsize=(17, 5.2))
    for k, srv in s["warm"].items():
        cs = sorted(srv)
        a.plot(cs, [srv[c]["mibps"] for c in cs], marker="o", color=COLORS[k], label=LABELS[k])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("aggregate MiB/s (median)")
    a.set_title("Warm 256 MiB blob: throughput")
    a.set_xscale("log", base=2)
    a.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    a.legend(fontsize=8, loc="lower right")
    for k, srv in s["manifest"].items():
        cs = sorted(srv)
        r.plot(cs, [srv[c]["rps"] for c in cs], marker="o", color=COLORS[k], label=LABELS[k])
        b.plot(cs, [srv[c]["p99_ms"] for c in cs], marker="o", color=COLORS[k], label=f"{LABELS[k]}")
        b.plot(cs, [srv[c]["p50_ms"] for c in cs], marker=".", ls="--", color=COLORS[k])
    for ax in (r, b):
        ax.set_xlabel("connections")
        ax.set_xscale("log", base=2)
        ax.set_xticks([8, 32, 64], ["8", "32", "64"])
        ax.grid(alpha=0.3, which="both")
    r.set_ylabel("requests/s (log)")
    r.set_yscale("log")
    r.set_title("Warm manifest by tag: requests/s")
    r.legend(fontsize=8, loc="center right")
    b.set_ylabel("latency ms (log): p99 solid, p50 dashed")
    b.set_yscale("log")
    b.axhline(5, color="grey", lw=0.8, ls=":")
    b.set_title("Warm manifest by tag: latency")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pier", default=os.environ.get("PIER_BIN", str(ROOT / "target/release/pier")))
    p.add_argument("--pier-rev", help="what to report as Pier's revision (default: the work tree's git HEAD)")
    p.add_argument("--quick", action="store_true", help="fewer and shorter runs, for smoke checks")
    p.add_argument("--out", default=str(HERE / "results"), help="results.json, results.md, plot.png, logs/")
    p.add_argument("--runs", type=int, help="warm blob runs per setting (default 5, quick 2)")
    p.add_argument("--cold-runs", type=int, help="cold pull / TTFB runs (default 5, quick 1)")
    p.add_argument("--cold32-runs", type=int, help="runs of the 32-cold-clients test (default 2, quick 1)")
    p.add_argument("--wrk-runs", type=int, help="wrk runs at 64 connections (default 3, quick 1)")
    p.add_argument("--wrk-seconds", type=int, help="seconds per wrk run (default 10, quick 3)")
    p.add_argument("--big-mib", type=int, default=256)
    p.add_argument("--small-layer", type=int, default=32768, help="bytes of random data per small layer")
    p.add_argument("--workdir", default=None, help="parent of the temp dir (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--only", metavar="SECTIONS",
                   help="comma-separated sections to run: 'warm blobs', manifests, rss, cold, cold32 "
                        "(default: all)")
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="run nothing: write results.md and plot.png to --out from an earlier results.json")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        s = summarize(res)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(markdown(res, s))
        plot(s, out / "plot.png")
        print(markdown(res, s))
        return 0
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.cold_runs = args.cold_runs or (1 if q else 5)
    args.cold32_runs = args.cold32_runs or (1 if q else 2)
    args.wrk_runs = args.wrk_runs or (1 if q else 3)
    args.wrk_seconds = args.wrk_seconds or (3 if q else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    ok = False
    try:
        bench.run()
        ok = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
    except Exception as e:  # noqa: BLE001 - report, clean up, keep partial figures
        import traceback
        traceback.print_exc()
        bench.error(f"aborted: {e!r}")
    finally:
        try:
            bench.scan_logs()
            bench.keep_logs()
        finally:
            bench.cleanup()
    res = bench.res
    s = summarize(res)
    res["summary"] = s
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res, s)
    (out / "results.md").write_text(md)
    try:
        plot(s, out / "plot.png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e!r}")
    print(md)
    log(f"wrote {out}/results.json, results.md, plot.png "
        f"({res['meta'].get('seconds', 0) / 60:.1f} min)")
    return 0 if ok and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
