"""The FiftyOne App for the user who starts it, and nobody else on the node, until that user stops it.

    python -m fathompipe.app [--dataset D] [--view V] [--port P] [--database-dir DIR] [--cache-gb G]

The open-source App has no login, and a loopback port is reachable by every user of a shared node. So
FiftyOne's App server runs inside this process behind a token gate (as Jupyter does): every request
(pages, GraphQL, the event stream, media, websockets) needs the random token in the URL this command
prints; a browser's first visit trades it for a cookie. Anything else gets 403, whoever finds the port.
The token is made here and only printed: never in a command line, a file or a log of fathompipe.

The database is fathompipe's private mongod (Unix socket, this user only: evaluation/private_database.py), joined if
running, unless FIFTYONE_DATABASE_URI (environment or .env) names another MongoDB. The App keeps running
whatever browsers do (closing the tab, a dropped ssh tunnel) until Ctrl-C, SIGTERM or SIGHUP; it then stops
the App server and, if no other fathompipe process of this user still uses it, mongod.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import hmac
import logging
import os
import secrets
import signal
import socket
import sys
from http.cookies import SimpleCookie
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, quote, urlencode

from fathompipe.evaluation import fiftyone_env, private_database

DEFAULT_PORT = 5151
Scope = Dict[str, object]
Receive = Callable[[], Awaitable[Dict[str, object]]]
Send = Callable[[Dict[str, object]], Awaitable[None]]


class AppError(RuntimeError):
    """The App cannot be served as asked; the message says what to change."""


class TokenGate:
    """ASGI middleware: a request passes with the token as `?token=`, in the cookie, or as `Authorization: token
    T`. A page request carrying `?token=` is redirected to the same URL without it, setting the cookie, so the
    token leaves the address bar; the App's own requests are same-origin and carry the cookie."""

    def __init__(self, app: Callable, token: str, cookie: str, page_script: str = "") -> None:
        self.app, self.token, self.cookie = app, token.encode(), cookie
        self.page_script = f"<script>{page_script}</script>".encode() if page_script else b""

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        """To the App; its HTML pages get `page_script` at the end of their head."""
        if not self.page_script or scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: List[Dict[str, object]] = []

        async def inject(message: Dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")  # type: ignore[arg-type]
                if b"text/html" in kind:
                    held.append(message)  # until the body is known: its length changes
                    return
            elif held and message["type"] == "http.response.body":
                held.append(message)
                if message.get("more_body"):
                    return
                start, *parts = held
                body = b"".join(p.get("body", b"") for p in parts)  # type: ignore[misc]
                body = body.replace(b"</head>", self.page_script + b"</head>", 1)
                headers = [(k, str(len(body)).encode() if k == b"content-length" else v)
                           for k, v in start["headers"]]  # type: ignore[union-attr]
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        await self.app(scope, receive, inject)

    def allows(self, value: Optional[str]) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token)  # type: ignore[union-attr]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)  # type: ignore
        headers: Dict[str, List[str]] = {}
        for k, v in scope["headers"]:  # type: ignore[attr-defined]
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        from_query = next((v for k, v in query if k == "token"), None)
        if self.allows(from_query):
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                rest = urlencode([(k, v) for k, v in query if k != "token"])
                path = scope.get("raw_path") or quote(str(scope["path"])).encode()
                location = path.decode("latin-1") + (f"?{rest}" if rest else "")  # type: ignore[union-attr]
                cookie = f"{self.cookie}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"
                return await self._respond(send, 302, b"", [(b"location", location.encode("latin-1")),
                                                           (b"set-cookie", cookie.encode())])
            return await self._pass(scope, receive, send)
        jar = SimpleCookie()
        for value in headers.get("cookie", []):
            try:
                jar.load(value)
            except Exception:  # another site's malformed cookie on 127.0.0.1 must not lock the user out
                continue
        scheme, _, credential = (headers.get("authorization") or [""])[0].partition(" ")
        if self.allows(jar[self.cookie].value if self.cookie in jar else None) or \
                (scheme.lower() in ("token", "bearer") and self.allows(credential.strip())):
            return await self._pass(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # before accept: the client sees 403
        return await self._respond(send, 403, b"fathompipe: this FiftyOne App is private. Open it with the URL, "
                                              b"token included, that `python -m fathompipe.app` printed.\n")

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes, headers: Sequence[Tuple[bytes, bytes]] = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})


def listen(port: Optional[int]) -> socket.socket:
    """A listening socket on 127.0.0.1: `port`, else 5151 when free, else any free port."""
    for candidate in ([port] if port is not None else [DEFAULT_PORT, 0]):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError as exc:
            sock.close()
            if port is not None:
                raise AppError(f"--port {port}: 127.0.0.1:{port} is not available ({exc.strerror}); choose another "
                               f"port, or leave --port out for a free one") from None
            continue
        sock.listen(128)
        return sock
    raise AssertionError("binding port 0 cannot fail")


def app_path(dataset: Optional[str], view: Optional[str]) -> str:
    """The App's address of the dataset and saved view, both checked first (a wrong name is one clear error)."""
    import fiftyone as fo
    from fiftyone.core.utils import to_slug

    if dataset is None:
        return "/"
    if not fo.dataset_exists(dataset):
        known = ", ".join(sorted(fo.list_datasets())) or "none"
        raise AppError(f"--dataset {dataset!r}: no such dataset in this database (datasets: {known})")
    path = "/datasets/" + quote(dataset, safe="")
    if view:
        views = fo.load_dataset(dataset).list_saved_views()
        if view not in views:
            raise AppError(f"--view {view!r}: dataset {dataset!r} has no such saved view (saved views: "
                           f"{', '.join(sorted(views)) or 'none'})")
        path += "?" + urlencode({"view": to_slug(view)})  # the App addresses a saved view by its slug
    return path


def shown_attributes(dataset: Optional[str]) -> str:
    """JavaScript that makes the App show truth, prediction, confidence and mistakenness on every patch of `dataset`
    without clicks, where the browser has no choice of its own yet (fiftyone_review.shown_label_attributes)."""
    if dataset is None:
        return ""
    import fiftyone as fo

    from fathompipe.evaluation.fiftyone_review import seed_script, shown_label_attributes
    return seed_script(shown_label_attributes(fo.load_dataset(dataset)))


def serve(listener: socket.socket, token: str, dataset: Optional[str], view: Optional[str], where: str) -> None:
    os.environ["FIFTYONE_SERVER"] = "1"  # before fiftyone's import, as fiftyone/server/main.py sets it (1.22.1)
    path = app_path(dataset, view)
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    # the App server's ASGI app, which fiftyone/server/main.py serves with hypercorn (fiftyone 1.22.1)
    from fiftyone.server.app import app as fiftyone_app

    # the execution store's start and stop chatter (six lines), and its warning that a standalone mongod has no
    # change streams, so it polls (expected: change streams need a replica set)
    logging.getLogger("fiftyone.operators.store.notification_service").setLevel(logging.ERROR)
    logging.getLogger("fiftyone.server.app").setLevel(logging.WARNING)
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]
    config.loglevel = "WARNING"
    config.graceful_timeout = 2  # open event streams are cut after this at shutdown
    gate = TokenGate(fiftyone_app, token, f"fathompipe-app-{port}", shown_attributes(dataset))
    url = f"http://127.0.0.1:{port}{path}{'&' if '?' in path else '?'}token={token}"
    target = f"dataset '{dataset}'" + (f", saved view '{view}'" if view else "") if dataset else "its datasets"
    print(f"FiftyOne App ({target}) for {getpass.getuser()} only, on 127.0.0.1:{port} of {socket.gethostname()}; "
          f"database: {where}.\n"
          f"  open:        {url}\n"
          f"  from a laptop, first: ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{socket.gethostname()}\n"
          f"The token in the URL is the key to the App: do not share it. Closing the browser leaves the App running; "
          f"stop it with Ctrl-C here (or kill -TERM {os.getpid()}).", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await hypercorn_serve(gate, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(run())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="open this dataset (default: the App's list of datasets)")
    parser.add_argument("--view", help="open this saved view of the dataset, e.g. eval_model_train-disagreements")
    parser.add_argument("--port", type=int, help=f"loopback port (default {DEFAULT_PORT}, or a free one if taken)")
    parser.add_argument("--database-dir", help="data directory of fathompipe's private database (default: "
                        "FiftyOne's, ~/.fiftyone/var/lib/mongo); an error when FIFTYONE_DATABASE_URI names another "
                        "MongoDB")
    parser.add_argument("--cache-gb", type=float, default=private_database.INTERACTIVE_CACHE_GB,
                        help="WiredTiger cache of that database when this command starts it (default %(default)s)")
    parser.add_argument("--env-file", help=".env with FIFTYONE_* variables (default: .env here or above)")
    args = parser.parse_args(argv)
    if args.view and not args.dataset:
        parser.error("--view needs --dataset")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # until the App runs: stop as Ctrl-C does, releasing the database
        signal.signal(sig, signal.default_int_handler)
    try:
        where = fiftyone_env.configure(env_file=args.env_file, database_dir=args.database_dir,
                                       cache_gb=args.cache_gb)
        if fiftyone_env.api_connection():
            raise AppError("FIFTYONE_API_URI/FIFTYONE_API_KEY select FiftyOne Enterprise, which serves its own App: "
                           "open the dataset in your deployment's web App")
        serve(listen(args.port), secrets.token_urlsafe(32), args.dataset, args.view, fiftyone_env.describe(where))
    except (AppError, fiftyone_env.FiftyOneSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    # the database is released at exit (private_database.release_all), after fiftyone's own exit handler has used it
    print("FiftyOne App stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
