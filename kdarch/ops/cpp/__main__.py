"""`python -m kdarch.ops.cpp`: build the compiled ops into the cache now (ahead of first use) and say where.

Exits non-zero, after the warning that names the cause, when they cannot be built here.
"""

import sys

from kdarch.ops.cpp import build

if __name__ == "__main__":
    ok = build.load()
    status = build.status()
    print(f"kdarch_C: ready at {status['path']}" if ok else f"kdarch_C: unavailable: {status['cause']}")
    sys.exit(0 if ok else 1)
