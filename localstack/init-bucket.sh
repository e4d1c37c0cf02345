#!/usr/bin/env bash
# Creates a bucket in LocalStack's S3 (or any S3 that takes these
# credentials); does nothing if it already exists. Needs only curl (>= 7.75,
# for --aws-sigv4): no aws CLI.
#
#   localstack/init-bucket.sh [BUCKET] [ENDPOINT]   # defaults: pier http://127.0.0.1:4566
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, default test / test
# (LocalStack accepts any).
set -euo pipefail

bucket=${1:-pier}
endpoint=${2:-http://127.0.0.1:4566}
endpoint=${endpoint%/}
user=${AWS_ACCESS_KEY_ID:-test}:${AWS_SECRET_ACCESS_KEY:-test}
sign=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$user")

body=$(mktemp)
trap 'rm -f "$body"' EXIT
code=$(curl -s -o "$body" -w '%{http_code}' --max-time 30 -X PUT "${sign[@]}" "$endpoint/$bucket") || code=000
case $code in
200) ;; # created (us-east-1 also answers 200 for a bucket the caller already owns)
409)
	# Someone else's bucket is an error; our own is fine.
	if ! grep -q BucketAlreadyOwnedByYou "$body"; then
		echo "init-bucket.sh: cannot create $bucket at $endpoint: $(cat "$body")" >&2
		exit 1
	fi
	;;
*)
	echo "init-bucket.sh: PUT $endpoint/$bucket answered $code: $(cat "$body")" >&2
	exit 1
	;;
esac
# It is there now, and these credentials can use it.
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -I "${sign[@]}" "$endpoint/$bucket") || code=000
if [[ $code != 200 ]]; then
	echo "init-bucket.sh: HEAD $endpoint/$bucket answered $code after creating it" >&2
	exit 1
fi
echo "bucket $bucket ready at $endpoint" >&2
