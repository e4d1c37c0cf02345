#!/usr/bin/env bash
# Starts (or stops) LocalStack's S3 for tests/localstack.rs, natively with
# localstack/start.sh, on a free loopback port, with its files under
# DIR/localstack. tests/setup.sh installs it (localstack/install.sh).
#
#   eval "$(tests/localstack.sh start DIR)"   # prints `export PIER_TEST_LOCALSTACK_ENDPOINT=...`
#   tests/localstack.sh stop DIR
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || {
	echo "usage: $0 start|stop DIR" >&2
	exit 2
}

case $cmd in
start)
	port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	endpoint=$("$root/localstack/start.sh" --background "$port" "$dir/localstack")
	echo "export PIER_TEST_LOCALSTACK_ENDPOINT=$endpoint"
	;;
stop)
	"$root/localstack/stop.sh" "$dir/localstack"
	;;
*)
	echo "usage: $0 start|stop DIR" >&2
	exit 2
	;;
esac
