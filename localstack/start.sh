#!/usr/bin/env bash
# Runs LocalStack's S3 natively, without Docker, on loopback only and
# offline: nothing it does reaches beyond 127.0.0.1 (see the environment
# below). Installs it first if needed (localstack/install.sh).
#
#   localstack/start.sh [PORT] [DATA_DIR]               # foreground; Ctrl-C (or SIGTERM to its PID) stops it
#   localstack/start.sh --background [PORT] [DATA_DIR]  # returns once S3 answers, prints the endpoint URL
#   localstack/stop.sh [DATA_DIR]                       # stops a --background one
#
# PORT defaults to 4566, DATA_DIR to ${TMPDIR:-/tmp}/pier-localstack. The
# foreground form execs LocalStack, so its PID is the script's: a caller may
# run `localstack/start.sh PORT DIR & pid=$!` and later `kill $pid`. The
# background form writes DATA_DIR/localstack.pid and DATA_DIR/localstack.log.
# State is in memory: buckets and objects are gone when it stops.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
	echo "usage: $0 [--background] [PORT] [DATA_DIR]" >&2
	exit 2
}

background=0
if [[ ${1:-} == --background ]]; then
	background=1
	shift
fi
[[ ${1:-} != -* ]] || usage
port=${1:-4566}
data=${2:-${TMPDIR:-/tmp}/pier-localstack}
[[ $port =~ ^[0-9]+$ ]] || usage
endpoint=http://127.0.0.1:$port

# Someone already answering there would pass the readiness check below.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
	echo "localstack/start.sh: something already listens on 127.0.0.1:$port" >&2
	exit 1
fi

venv=$("$here/install.sh" | tail -n 1)
mkdir -p "$data"
data=$(cd "$data" && pwd)
# The service index install.sh built (LocalStack's read-only static libs).
mkdir -p "$data/fs/usr/lib"
ln -sfn "$venv/static-libs" "$data/fs/usr/lib/localstack"

export PIER_LOCALSTACK_DATA=$data # launch.py: S3's temporary files go here
# Only S3, served by hypercorn on exactly this address (the default server
# binds 0.0.0.0).
export SERVICES=s3
export GATEWAY_LISTEN=127.0.0.1:$port
export GATEWAY_SERVER=hypercorn
# The host it writes into the URLs it hands out (default
# localhost.localstack.cloud:4566, a public DNS name).
export LOCALSTACK_HOST=127.0.0.1:$port
# The host directory layout, all under DATA_DIR: this image has /.dockerenv,
# which would make LocalStack use /var/lib/localstack.
export OVERRIDE_IN_DOCKER=0
export FILESYSTEM_ROOT=$data/fs
# No ~/.localstack/*.env profiles.
export CONFIG_DIR=$data/conf
# Offline: no analytics events; a self-signed TLS certificate instead of
# downloading one; no DNS server (it would bind port 53 and probe 8.8.8.8
# and the system's resolvers for localstack.cloud); no Docker daemon (it
# asks /var/run/docker.sock, or a remote DOCKER_HOST, for its version at
# startup; S3 needs none); and LocalStack's own APIs pointed at a closed
# loopback port in case anything still tries them.
export DISABLE_EVENTS=1
export SKIP_SSL_CERT_DOWNLOAD=1
export DNS_ADDRESS=0
export DOCKER_HOST=unix://$data/no-docker.sock
export API_ENDPOINT=http://127.0.0.1:9
export ANALYTICS_API=http://127.0.0.1:9
unset LOCALSTACK_AUTH_TOKEN LOCALSTACK_API_KEY

# Ready: the health endpoint lists S3, and a signed ListBuckets works (which
# also loads the S3 provider, so the first real request is not slow). No
# `curl | grep -q`: under pipefail, curl's SIGPIPE would make that fail.
ready() {
	local health
	health=$(curl -sf --max-time 2 "$endpoint/_localstack/health") &&
		[[ $health =~ \"s3\":\ \"(available|running)\" ]] &&
		[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
			--aws-sigv4 "aws:amz:us-east-1:s3" --user test:test "$endpoint/") == 200 ]]
}

# Polls until ready (60 s at most) while process $1 lives.
wait_ready() {
	local pid=$1
	for _ in $(seq 1 600); do
		kill -0 "$pid" 2>/dev/null || return 1
		ready 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

if ((background)); then
	pidfile=$data/localstack.pid
	if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
		echo "localstack/start.sh: already running (PID $(cat "$pidfile"), $pidfile)" >&2
		exit 1
	fi
	"$venv/bin/python" "$here/launch.py" </dev/null >"$data/localstack.log" 2>&1 &
	pid=$!
	echo "$pid" >"$pidfile"
	started=$SECONDS
	if ! wait_ready "$pid"; then
		echo "localstack/start.sh: LocalStack did not become ready; its log:" >&2
		tail -n 40 "$data/localstack.log" >&2 || true
		kill "$pid" 2>/dev/null || true
		rm -f "$pidfile"
		exit 1
	fi
	echo "LocalStack S3 ready at $endpoint after $((SECONDS - started)) s (PID $pid, log $data/localstack.log)" >&2
	echo "$endpoint"
else
	# Announce readiness from a helper; `exec` keeps the PID ($$ in the helper).
	(
		if wait_ready $$; then
			echo "LocalStack S3 ready at $endpoint (create a bucket: localstack/init-bucket.sh pier $endpoint)" >&2
		fi
	) &
	exec "$venv/bin/python" "$here/launch.py"
fi
