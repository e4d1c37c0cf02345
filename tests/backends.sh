#!/usr/bin/env bash
# Starts (or stops) the shared backends the test suite runs against, on
# loopback only: a redis-server, and a SeaweedFS S3 server (it verifies SigV4
# signatures as AWS does). tests/setup.sh installs them.
#
#   eval "$(tests/backends.sh start DIR)"   # prints `export PIER_TEST_...` lines
#   tests/backends.sh stop DIR
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || {
	echo "usage: $0 start|stop DIR" >&2
	exit 2
}

# A free loopback port whose +10000 neighbour is free too (SeaweedFS puts
# its gRPC ports there).
free_port() {
	python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(20000, 30000)
    if free(p) and free(p + 10000):
        print(p); break
PY
}

wait_for() { # what, command...
	local what=$1
	shift
	for _ in $(seq 1 150); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	echo "$what did not start; its log:" >&2
	tail -30 "$dir/$what.log" >&2 || true
	exit 1
}

case $cmd in
start)
	mkdir -p "$dir"
	redis_port=$(free_port)
	redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
		--dir "$dir" >"$dir/redis.log" 2>&1 &
	echo $! >"$dir/redis.pid"
	wait_for redis redis-cli -p "$redis_port" ping

	access=pieraccess
	secret=piersecret
	cat >"$dir/s3.json" <<JSON
{"identities":[{"name":"pier","credentials":[{"accessKey":"$access","secretKey":"$secret"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
	mkdir -p "$dir/weed"
	master=$(free_port)
	volume=$(free_port)
	filer=$(free_port)
	s3=$(free_port)
	weed server -dir="$dir/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
		-master.port="$master" -volume.port="$volume" -filer -filer.port="$filer" \
		-s3 -s3.port="$s3" -s3.config="$dir/s3.json" -master.volumeSizeLimitMB=128 -volume.max=0 -volume.preStopSeconds=0 \
		-s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
		>"$dir/weed.log" 2>&1 &
	echo $! >"$dir/weed.pid"
	# Anonymous requests are refused (403) once the S3 gateway is up.
	wait_for weed sh -c "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$s3/ | grep -q 403"

	# The shared test bucket (curl signs the request with SigV4).
	curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access:$secret" \
		"http://127.0.0.1:$s3/pier-test" >/dev/null

	echo "export PIER_TEST_REDIS_URL=redis://127.0.0.1:$redis_port"
	echo "export PIER_TEST_S3_ENDPOINT=http://127.0.0.1:$s3"
	echo "export PIER_TEST_S3_ACCESS_KEY=$access"
	echo "export PIER_TEST_S3_SECRET_KEY=$secret"
	echo "export PIER_TEST_S3_BUCKET=pier-test"
	;;
stop)
	for name in redis weed; do
		if [[ -f $dir/$name.pid ]]; then
			pid=$(cat "$dir/$name.pid")
			kill "$pid" 2>/dev/null || true
			# SeaweedFS can take its time; do not leave it behind.
			for _ in $(seq 1 50); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -9 "$pid" 2>/dev/null || true
			rm -f "$dir/$name.pid"
		fi
	done
	;;
*)
	echo "usage: $0 start|stop DIR" >&2
	exit 2
	;;
esac
