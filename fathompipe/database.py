"""fathompipe's private FiftyOne database, for your own FiftyOne sessions on the same data.

    python -m fathompipe.database [--database-dir DIR] [--cache-gb G]

Starts (or joins) the mongod that the App command and the evaluate stage use: FiftyOne's bundled mongod on
FiftyOne's data directory, listening only on a Unix socket that no other user can open
(fathompipe/evaluation/private_database.py). It prints the `export` line that points a FiftyOne session at it and
keeps the database up until Ctrl-C (it stays up longer while an App or a job of yours on this node uses it).
In a script or notebook, instead, before `import fiftyone`:

    import fathompipe.database; fathompipe.database.use()
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import List, Optional

from fathompipe.evaluation import fiftyone_env, private_database


def use(database_dir: Optional[str] = None, cache_gb: float = private_database.INTERACTIVE_CACHE_GB) -> str:
    """Point this process's FiftyOne at fathompipe's private database (started if needed, left at exit),
    or at FIFTYONE_DATABASE_URI when that is set; call it before `import fiftyone`. Returns where, for humans."""
    if "fiftyone" in sys.modules:
        raise RuntimeError("call fathompipe.database.use() before `import fiftyone`: FiftyOne reads its database "
                           "settings once, when it is imported")
    return fiftyone_env.describe(fiftyone_env.configure(database_dir=database_dir, cache_gb=cache_gb))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.database", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-dir", help="data directory (default: FiftyOne's, ~/.fiftyone/var/lib/mongo)")
    parser.add_argument("--cache-gb", type=float, default=private_database.INTERACTIVE_CACHE_GB,
                        help="WiredTiger cache when this command starts mongod (default %(default)s)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        where = fiftyone_env.configure(database_dir=args.database_dir, cache_gb=args.cache_gb)
        if "private_database" not in where:
            print(f"FiftyOne is configured for {fiftyone_env.describe(where)} (FIFTYONE_DATABASE_URI or FiftyOne "
                  f"Enterprise): fathompipe starts no database; your sessions use that one as they are.")
            return 0
        uri = os.environ["FIFTYONE_DATABASE_URI"]
        print(f"{fiftyone_env.describe(where)}.\nIn a shell on this node, before starting Python:\n"
              f"  export FIFTYONE_DATABASE_URI={shlex.quote(uri)} FIFTYONE_DATABASE_VALIDATION=false\n"
              f"It stays up while this command runs (Ctrl-C to stop it) and while a fathompipe App or job of "
              f"yours on this node uses it.", flush=True)
        while True:
            signal.pause()
    except fiftyone_env.FiftyOneSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
