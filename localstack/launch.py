"""Runs LocalStack's runtime, as `python -m localstack.runtime.main` does,
with three tweaks no setting offers (localstack/start.sh runs it; the pinned
version is in localstack/install.sh):

- When S3 loads, LocalStack resolves `s3.localhost.localstack.cloud` (a
  public DNS name) to choose the host name of its internal clients: a query
  to the machine's DNS servers. It is told the lookup failed, which makes it
  use `localhost`, as it does on a machine without DNS.
- S3 keeps multipart parts and large objects under a fixed
  /tmp/localstack-s3-storage, shared by every instance: it goes under this
  instance's data directory instead (PIER_LOCALSTACK_DATA).
- On SIGTERM or Ctrl-C the hypercorn server calls `loop.stop()` from another
  thread without waking the event loop, which then sleeps in `select`
  forever once its sockets are closed: the process never exits. The loop is
  woken up after that call.
"""

import os
import runpy
import sys

from localstack.runtime.server import hypercorn
from localstack.services.s3 import provider
from localstack.utils.aws import aws_stack

for module, name in [
    (aws_stack, "CACHE_S3_HOSTNAME_DNS_STATUS"),
    (provider, "DEFAULT_S3_TMP_DIR"),
    (hypercorn, "HypercornRuntimeServer"),
]:
    if not hasattr(module, name):
        sys.exit(
            f"localstack/launch.py: {module.__name__}.{name} is gone: "
            "re-check these tweaks against the LocalStack version installed"
        )

aws_stack.CACHE_S3_HOSTNAME_DNS_STATUS = False
provider.DEFAULT_S3_TMP_DIR = os.path.join(os.environ["PIER_LOCALSTACK_DATA"], "s3")

_shutdown = hypercorn.HypercornRuntimeServer.shutdown


def _shutdown_and_wake(self):
    _shutdown(self)
    try:
        self.loop.call_soon_threadsafe(self.loop.stop)
    except RuntimeError:  # the loop is closed already
        pass


hypercorn.HypercornRuntimeServer.shutdown = _shutdown_and_wake

sys.argv = ["localstack.runtime.main"]
runpy.run_module("localstack.runtime.main", run_name="__main__", alter_sys=True)
