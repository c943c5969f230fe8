"""Which FiftyOne database a job talks to, chosen inside the job before fiftyone is imported.

FiftyOne reads its connection from the environment at import time: fathompipe's private database
(default: FiftyOne's bundled mongod on FiftyOne's data directory, started by fathompipe on a Unix socket
only this user can open; private_database.py), an external MongoDB (`FIFTYONE_DATABASE_URI`, config.json's
`database_uri`, or `evaluate.database_uri`), or FiftyOne Enterprise through its API (`FIFTYONE_API_URI` +
`FIFTYONE_API_KEY`, Enterprise SDK only).
A named deployment, as in the researchers' scripts, maps `<NAME>_FIFTYONE_API_URI`/`_KEY` onto the
two plain variables. Values come from the environment or a `.env` file and are read here, at run
time, so no secret is ever part of a configuration, a job script, a pickle or a log.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Dict, Optional

from fathompipe.config import redact
from fathompipe.evaluation import private_database

API_URI, API_KEY = "FIFTYONE_API_URI", "FIFTYONE_API_KEY"


class FiftyOneSetupError(RuntimeError):
    """FiftyOne cannot be used as configured; the message says what to change."""


def dotenv_file(env_file: Optional[str] = None) -> Optional[Path]:
    """`env_file` if given (it must exist), else the first `.env` in the working directory or above."""
    if env_file:
        path = Path(env_file).expanduser()
        if not path.is_file():
            raise FiftyOneSetupError(f"evaluate.env_file={env_file!r}: file does not exist")
        return path
    from dotenv import find_dotenv
    found = find_dotenv(usecwd=True)
    return Path(found) if found else None


def load_dotenv_fiftyone(path: Optional[Path]) -> None:
    """FiftyOne's variables from `path` (FIFTYONE_* and <NAME>_FIFTYONE_*) into the environment;
    the environment wins, as with python-dotenv's load_dotenv. Other variables stay out."""
    if path is None:
        return
    from dotenv import dotenv_values
    for key, value in dotenv_values(path).items():
        if value is not None and (key.startswith("FIFTYONE_") or "_FIFTYONE_" in key):
            os.environ.setdefault(key, value)


def use_deployment(name: str, source: str) -> str:
    """Map `<NAME>_FIFTYONE_API_URI`/`_KEY` onto FIFTYONE_API_URI/KEY; returns the URI (not secret)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise FiftyOneSetupError(f"deployment {name!r}: letters, digits and _ only (it prefixes variable names)")
    prefix = name.upper()
    uri, key = os.environ.get(f"{prefix}_{API_URI}"), os.environ.get(f"{prefix}_{API_KEY}")
    missing = [v for v, value in ((f"{prefix}_{API_URI}", uri), (f"{prefix}_{API_KEY}", key)) if not value]
    if missing:
        raise FiftyOneSetupError(f"deployment {name!r}: {' and '.join(missing)} not set in the environment or "
                                 f"{source}. Add them to a .env file in the directory you submit from (or set "
                                 f"evaluate.env_file), e.g. {prefix}_{API_URI}=https://<your deployment>")
    os.environ[API_URI], os.environ[API_KEY] = uri, key  # type: ignore[assignment]
    return uri  # type: ignore[return-value]


def api_connection() -> bool:
    """True when FiftyOne talks to an Enterprise API server rather than to MongoDB directly."""
    return bool(os.environ.get(API_URI) or os.environ.get(API_KEY))


def enterprise_sdk_installed() -> bool:
    return importlib.util.find_spec("fiftyone.management") is not None


def configure(database_uri: Optional[str] = None, deployment: Optional[str] = None,
              env_file: Optional[str] = None, database_dir: Optional[str] = None,
              cache_gb: float = private_database.INTERACTIVE_CACHE_GB) -> Dict[str, str]:
    """Set FiftyOne's connection variables for this process; returns a description fit for logs. Without an
    external database or an API connection, starts (or joins) the private mongod on `database_dir` (default
    FiftyOne's) with a WiredTiger cache of `cache_gb`, for the rest of the process (`release_database`)."""
    path = dotenv_file(env_file)
    load_dotenv_fiftyone(path)
    source = str(path) if path else "a .env file (none found)"
    where: Dict[str, str] = {}
    if deployment:
        where["deployment"] = deployment
        where["api_uri"] = redact({"u": use_deployment(deployment, source)})["u"]
    elif os.environ.get(API_URI):
        where["api_uri"] = redact({"u": os.environ[API_URI]})["u"]
    if api_connection():
        if not enterprise_sdk_installed():
            named = f"deployment {deployment!r} ({where['api_uri']}) selects" if deployment else \
                f"{API_URI}/{API_KEY} are set and select"
            raise FiftyOneSetupError(
                f"{named} FiftyOne Enterprise, but the installed FiftyOne is the open-source package, which "
                f"ignores them and would write to a local database instead. Install Voxel51's Enterprise SDK "
                f"(FIFTYONE_ENTERPRISE_INDEX_URL=<private index URL> bash setup.sh), or remove the deployment "
                f"(and unset {API_URI}/{API_KEY}) to use the local or `evaluate.database_uri` database.")
        if database_uri:
            raise FiftyOneSetupError("evaluate.database_uri and a FiftyOne Enterprise API connection are both set; "
                                     "choose one")
    if database_uri:
        os.environ["FIFTYONE_DATABASE_URI"] = database_uri
    uri = os.environ.get("FIFTYONE_DATABASE_URI") or str(private_database.fiftyone_config().get("database_uri") or "")
    data_dir = Path(database_dir) if database_dir else private_database.fiftyone_database_dir()
    managed = private_database.in_use(uri) if uri else None
    if api_connection():
        pass
    elif uri and managed is None and uri != private_database.private_uri(data_dir):  # exported from `database`
        if database_dir:
            raise FiftyOneSetupError(f"evaluate.database_dir={database_dir!r} is set, but so is a MongoDB URI "
                                     f"({redact({'u': uri})['u']}, from FIFTYONE_DATABASE_URI, evaluate.database_uri "
                                     f"or FiftyOne's config.json); choose one")
        where["database"] = redact({"u": uri})["u"]
    else:
        try:
            managed = managed or private_database.use(data_dir, cache_gb)
        except private_database.MongodError as exc:
            raise FiftyOneSetupError(str(exc)) from None
        os.environ["FIFTYONE_DATABASE_URI"] = managed.uri
        where.update(private_database=str(managed.data_dir), socket=str(managed.socket),
                     cache_gb="mongod's default" if managed.cache_gb is None else f"{managed.cache_gb:g} GB")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")  # the bundled mongod 6.0 warns otherwise
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    return where


def release_database() -> None:
    """Leave the private database (the last of this user's processes using it stops mongod); also at exit."""
    private_database.release_all()


def describe(where: Dict[str, str]) -> str:
    if "api_uri" in where:
        name = f" deployment '{where['deployment']}'" if "deployment" in where else ""
        return f"FiftyOne Enterprise{name} at {where['api_uri']}"
    if "database" in where:
        return f"the MongoDB at {where['database']}"
    return (f"fathompipe's private database (FiftyOne's mongod on {where['private_database']}, reachable by this "
            f"user only through {where['socket']}; WiredTiger cache {where['cache_gb']})")
