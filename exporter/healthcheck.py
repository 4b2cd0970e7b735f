"""The container's HEALTHCHECK: `python -m kvmnet.exporter.healthcheck [URL]`, exit 0 if the exporter answers.

URL defaults to $KVMNET_HEALTHCHECK_URL, else http://127.0.0.1:9848/healthz. This is a liveness check from inside
the container, so for https it does not verify the certificate (it is the exporter's own, on loopback), and a 401
(basic auth on, no credentials here) counts as alive: the server parsed the request and answered.
Standard library only, so it starts in ~50 ms.
"""
from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else os.environ.get("KVMNET_HEALTHCHECK_URL", "http://127.0.0.1:9848/healthz")
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if status in (200, 401):
        return 0
    print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
