#!/usr/bin/env python3
"""A fleet rollout, measured: N nodes pull one new image at once through a
cluster of Pier replicas. Prints figures; it is not a test.

On loopback only, every server started here and stopped at the end:

  upstream   docker-registry holding the rollout image (--layers layers of
             --layer-mib MiB and a config), behind nginx with `limit_rate`
             (--upstream-mibps per connection): the scarce link, as a real
             upstream is
  cluster    --replicas Pier replicas on SeaweedFS S3 + redis-server
             (tests/backends.sh), each with a local cache of blob copies,
             behind nginx configured as deploy/nginx.conf
  load       examples/fleet_load (Rust, async): N nodes, each pulling as
             dockerd does (manifest by tag, then config and layers three at
             a time), every blob's digest and length checked

For each N, cold (a fresh namespace in the bucket and Redis, fresh
replicas) then warm (the same replicas again). Figures per run: completion
p50/p99/max and time to first byte p50/p99 over the nodes; upstream GETs per
blob (from the upstream's access log); blob bytes the replicas served from
their cache and from upstream as it arrived (/metrics); each replica's CPU
seconds and peak RSS; Redis commands per pull; errors and digest
mismatches.

  tests/bench/fleet.py --pier target/release/pier \\
      --load target/release/examples/fleet_load [--nodes 1,10,100,300,1000]

Python 3.11 standard library; shares bench.py's process handling.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import ROOT, Procs, cpu_seconds, descendants, free_port, log, status_kib, wait_http

MiB = 1 << 20


def redis_commands(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "stats"], capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"total_commands_processed:(\d+)", out).group(1))


def metric_sum(text, name, label=None):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Fleet:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.work = Path(tempfile.mkdtemp(prefix="pier-fleet."))
        for d in ("logs", "cfg"):
            (self.work / d).mkdir()
        self.seq = 0

    # ------------------------------------------------------------ servers

    def nginx(self, name, body):
        d = self.work / name
        d.mkdir()
        port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        # nginx may not raise its open file limit past the hard one.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
        temps = "".join(f"    {t}_temp_path {d}/{t};\n"
                        for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes auto;\nworker_rlimit_nofile {nofile};\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
            f"events {{ worker_connections 16384; }}\n"
            f"http {{\n    access_log off;\n{temps}{body.replace('PORT', str(port))}}}\n")
        proc = self.procs.spawn(name, ["nginx", "-e", d / "error.log", "-p", d, "-c", d / "nginx.conf"],
                                self.work / "logs" / f"{name}.log")
        return proc, f"http://127.0.0.1:{port}"

    def start_upstream(self):
        port = free_port()
        root = self.work / "upstream"
        cfg = self.work / "cfg" / "upstream.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: pier-fleet\n")
        self.up_log = self.work / "logs" / "upstream.access.log"
        self.upstream = self.procs.spawn("upstream", ["docker-registry", "serve", cfg], self.up_log,
                                         errfile=self.work / "logs" / "upstream.err.log")
        self.up_direct = f"http://127.0.0.1:{port}"
        wait_http(f"{self.up_direct}/v2/", self.upstream)
        rate = self.args.upstream_mibps * MiB
        _, self.up_url = self.nginx("upstream-link", (
            "    server {\n        listen 127.0.0.1:PORT;\n"
            f"        location / {{\n            proxy_pass {self.up_direct};\n"
            "            proxy_http_version 1.1;\n            proxy_buffering off;\n"
            f"            limit_rate {rate};\n        }}\n    }}\n"))
        wait_http(f"{self.up_url}/v2/")

    def push_image(self):
        layout = self.work / "layout"
        gen = ROOT / "tests/fixtures/gen_images.py"
        log(f"generating the rollout image: {self.args.layers} x {self.args.layer_mib} MiB")
        subprocess.run([sys.executable, gen, "--out", layout, "--tag", "v1", "--seed", "fleet/rollout:v1",
                        "--layers", str(self.args.layers),
                        "--layer-size", str(self.args.layer_mib * MiB)], check=True)
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:v1", f"docker://{self.up_direct.removeprefix('http://')}/bench/rollout:v1"],
                       check=True)
        shutil.rmtree(layout)
        req = urllib.request.Request(f"{self.up_direct}/v2/bench/rollout/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req) as r:
            m = json.load(r)
        self.blobs = [m["config"]["digest"]] + [layer["digest"] for layer in m["layers"]]
        self.image_bytes = m["config"]["size"] + sum(layer["size"] for layer in m["layers"])

    def start_backends(self):
        d = self.work / "backends"
        p = subprocess.run(["bash", ROOT / "tests/backends.sh", "start", d], capture_output=True,
                           text=True, timeout=180)
        if p.returncode:
            raise RuntimeError(f"tests/backends.sh failed: {p.stderr}")
        self.backends = d
        self.env = dict(re.findall(r"^export (\w+)=(\S*)$", p.stdout, re.M))
        self.redis_port = int(self.env["PIER_TEST_REDIS_URL"].rsplit(":", 1)[1])

    def start_cluster(self):
        self.seq += 1
        ns = f"fleet-{os.getpid()}-{self.seq}"
        e = self.env
        self.replicas = []
        for r in range(self.args.replicas):
            name = f"pier-{self.seq}-{r}"
            port = free_port()
            cfg = self.work / "cfg" / f"{name}.toml"
            cfg.write_text(
                f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\n'
                f'[storage]\nkind = "s3"\nbucket = "{e["PIER_TEST_S3_BUCKET"]}"\nprefix = "{ns}"\n'
                f'endpoint = "{e["PIER_TEST_S3_ENDPOINT"]}"\naccess_key_id = "{e["PIER_TEST_S3_ACCESS_KEY"]}"\n'
                f'secret_access_key = "{e["PIER_TEST_S3_SECRET_KEY"]}"\n'
                f'spool_path = "{self.work / name}/spool"\nlocal_cache_path = "{self.work / name}/copies"\n'
                f'local_cache_size = "8GiB"\n{self.args.storage_extra}\n'
                f'[metadata]\nkind = "redis"\nurl = "{e["PIER_TEST_REDIS_URL"]}"\nkey_prefix = "{ns}:"\n'
                f'[cluster]\nadvertise_url = "http://127.0.0.1:{port}"\n'
                f'[limits]\nrequests_per_second = 0\n'
                f'[[upstreams]]\nregistry = "docker.io"\nendpoints = ["{self.up_url}"]\n')
            proc = self.procs.spawn(name, [self.args.pier, "serve", "--config", cfg],
                                    self.work / "logs" / f"{name}.log")
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz", proc)
            self.replicas.append((proc, base))
        servers = "".join(f"        server {b.removeprefix('http://')};\n" for _, b in self.replicas)
        self.lb_proc, self.lb = self.nginx(f"lb-{self.seq}", (
            f"    upstream pier {{\n{servers}        keepalive 64;\n    }}\n"
            "    server {\n        listen 127.0.0.1:PORT backlog=4096;\n        client_max_body_size 0;\n"
            "        proxy_http_version 1.1;\n        proxy_set_header Connection \"\";\n"
            "        proxy_set_header Host $http_host;\n        proxy_buffering off;\n"
            "        proxy_request_buffering off;\n        proxy_max_temp_file_size 0;\n"
            "        proxy_read_timeout 900s;\n        proxy_send_timeout 900s;\n"
            "        proxy_redirect off;\n        location / {\n            proxy_pass http://pier;\n"
            "        }\n    }\n"))
        wait_http(f"{self.lb}/healthz")

    def stop_cluster(self):
        for proc, _ in self.replicas:
            self.procs.stop(proc)
        self.procs.stop(self.lb_proc)

    # ------------------------------------------------------------ one run

    def upstream_gets(self):
        gets = {}
        for line in self.up_log.read_text(errors="replace").splitlines():
            m = re.search(r'"GET /v2/bench/rollout/blobs/(sha256:[0-9a-f]{64})', line)
            if m:
                gets[m.group(1)] = gets.get(m.group(1), 0) + 1
        return gets

    def metrics(self):
        out = []
        for _, base in self.replicas:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
                out.append(r.read().decode())
        return out

    def run(self, n, kind):
        gets_before = self.upstream_gets()
        m_before = self.metrics()
        redis_before = redis_commands(self.redis_port)
        pids = [descendants(p.pid) for p, _ in self.replicas]
        cpu_before = [cpu_seconds(p) for p in pids]
        out = subprocess.run([self.args.load, "--base", self.lb, "--image", "docker.io/bench/rollout:v1",
                              "--nodes", str(n), "--timeout", str(self.args.timeout)],
                             capture_output=True, text=True, timeout=self.args.timeout + 120)
        try:
            res = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"fleet_load printed no figures: {out.stderr}")
        cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before)]
        rss = [sum(status_kib(pid, "VmHWM") or 0 for pid in p) / 1024 for p in pids]
        gets_after = self.upstream_gets()
        gets = {d: gets_after.get(d, 0) - gets_before.get(d, 0) for d in self.blobs}
        m_after = self.metrics()
        served = {}
        for origin in ("local", "bucket", "upstream", "peer"):
            label = f'origin="{origin}"'
            served[origin] = sum(metric_sum(a, "pier_blob_bytes_served_total", label)
                                 - metric_sum(b, "pier_blob_bytes_served_total", label)
                                 for a, b in zip(m_after, m_before)) / (1 << 30)
        res.update({
            "kind": kind,
            "upstream_gets_per_blob": {"min": min(gets.values()), "max": max(gets.values())},
            "served_gib": served,
            "replica_cpu_s": [round(c, 2) for c in cpu],
            "replica_peak_rss_mib": [round(r) for r in rss],
            "cpu_s_per_gib_served": sum(cpu) / max(res["bytes"] / (1 << 30), 1e-9),
            "redis_commands_per_pull": (redis_commands(self.redis_port) - redis_before) / n,
        })
        log(f"N={n} {kind}: p50 {res['completion_s']['p50']:.2f}s p99 {res['completion_s']['p99']:.2f}s, "
            f"errors {res['errors']}, mismatches {res['mismatches']}, upstream GETs/blob "
            f"{res['upstream_gets_per_blob']}, CPU {res['replica_cpu_s']}")
        return res

    def settle(self):
        """Until every replica's fetches (and their uploads) are done."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if all("pier_blob_fetches_in_flight 0" in m for m in self.metrics()):
                return
            time.sleep(0.5)

    def main(self):
        results = []
        try:
            self.start_backends()
            self.start_upstream()
            self.push_image()
            for n in [int(x) for x in self.args.nodes.split(",")]:
                self.start_cluster()
                try:
                    results.append({"n": n, **self.run(n, "cold")})
                    self.settle()
                    results.append({"n": n, **self.run(n, "warm")})
                finally:
                    self.stop_cluster()
        finally:
            self.procs.stop_all()
            if getattr(self, "backends", None):
                subprocess.run(["bash", ROOT / "tests/backends.sh", "stop", self.backends],
                               capture_output=True)
        link = self.args.upstream_mibps
        one_fetch = self.image_bytes / MiB / link
        print(f"Rollout image {self.image_bytes / MiB:.0f} MiB ({self.args.layers} layers), "
              f"upstream link {link} MiB/s per connection (one fetch of the biggest layer alone: "
              f"{self.args.layer_mib / link:.1f} s; of all layers one after another: {one_fetch:.1f} s), "
              f"{self.args.replicas} replicas behind nginx:")
        print_table(results)
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(results, indent=2))
        if self.args.plot:
            plot({"Pier": results}, self.args.plot)
        return 1 if any(r["errors"] or r["mismatches"] for r in results) else 0


def print_table(results):
    """The figures as a Markdown table, a row per run."""
    print("| N | run | completion p50 / p99 / max (s) | TTFB p50 / p99 (s) | upstream GETs per blob "
          "| served from local / bucket / upstream / peer / redirect (GiB) | replica CPU (s) "
          "| CPU s per GiB | peak RSS (MiB) | Redis cmds per pull | errors | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c, t, g = r["completion_s"], r["ttfb_s"], r["upstream_gets_per_blob"]
        gets = str(g["min"]) if g["min"] == g["max"] else f"{g['min']}–{g['max']}"
        print(f"| {r['n']} | {r['kind']} | {c['p50']:.2f} / {c['p99']:.2f} / {c['max']:.2f} "
              f"| {t['p50']:.2f} / {t['p99']:.2f} | {gets} "
              f"| {' / '.join(f'{v:.2f}' for v in r['served_gib'].values())} / "
              f"{r['redirected_bytes'] / (1 << 30):.2f} "
              f"| {' + '.join(f'{x:.1f}' for x in r['replica_cpu_s'])} | {r['cpu_s_per_gib_served']:.2f} "
              f"| {' / '.join(str(x) for x in r['replica_peak_rss_mib'])} "
              f"| {r['redis_commands_per_pull']:.1f} | {r['errors']} | {r['mismatches']} |")


def plot(series, path):
    """Completion time and replica CPU against N, cold and warm, for each
    labelled run (`series`: label -> the figures fleet.py wrote as JSON)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"cold": "-", "warm": "--"}
    for i, (label, results) in enumerate(series.items()):
        color = f"C{i}"
        for kind in ("cold", "warm"):
            rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["n"])
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            left.plot(ns, [r["completion_s"]["p99"] for r in rows], styles[kind], marker="o",
                      color=color, label=f"{label}, {kind}")
            # A log axis has no 0: a run too short to measure is left out.
            cpu = [sum(r["replica_cpu_s"]) or float("nan") for r in rows]
            right.plot(ns, cpu, styles[kind], marker="o",
                       color=color, label=f"{label}, {kind}")
    ticks = sorted({r["n"] for results in series.values() for r in results})
    for ax, title, ylabel in ((left, "Completion per node, p99", "seconds"),
                              (right, "CPU of all replicas", "CPU seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("nodes pulling at once")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("A fleet rollout through 3 Pier replicas (tests/bench/fleet.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier")
    p.add_argument("--load", help="the fleet_load example's binary")
    p.add_argument("--nodes", default="1,10,100,300,1000")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--layer-mib", type=int, default=64)
    p.add_argument("--upstream-mibps", type=int, default=64)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--storage-extra", default="", help="extra [storage] lines (presigned_redirect = true)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--plot", metavar="PNG", help="plot completion and CPU against N here (matplotlib); "
                   "with --series, from earlier runs' JSON instead of running")
    p.add_argument("--series", action="append", default=[], metavar="LABEL=JSON",
                   help="a run's figures (from --out) to plot under LABEL")
    a = p.parse_args()
    if a.series:
        if not a.plot:
            p.error("--series needs --plot")
        series = {label: json.loads(Path(f).read_text())
                  for label, f in (x.split("=", 1) for x in a.series)}
        for label, results in series.items():
            print(f"{label}:")
            print_table(sorted(results, key=lambda r: (r["n"], r["kind"])))
        plot(series, a.plot)
        sys.exit(0)
    if not (a.pier and a.load):
        p.error("--pier and --load are required to run")
    a.pier = str(Path(a.pier).resolve())
    a.load = str(Path(a.load).resolve())
    sys.exit(Fleet(a).main())
