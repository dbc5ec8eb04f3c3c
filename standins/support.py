"""What the demo, the tests and the benchmarks share when they run ponte next to the stand-ins:
a free local port, a WSGI app served on a thread, a log of the requests a stand-in answered
(time and status, server side), and waiting for something another process or thread does."""
from __future__ import annotations

import socket
import threading
import time

from werkzeug.serving import make_server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """A WSGI app served on 127.0.0.1 (`port`, or a free one) by a daemon thread: `.url`,
    `.port`, `.app`; `stop()` shuts it down."""

    def __init__(self, app, port: int = 0):
        self.app = app
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str | None = None,
             ignoring: tuple[type[BaseException], ...] = ()):
    """Call `predicate` every `interval` seconds until it returns something true, and return
    that. An exception of a type in `ignoring` counts as "not yet". After `timeout` seconds:
    None, or, when `what` is given, a TimeoutError naming it and the last result."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    if what is None:
        return None
    raise TimeoutError(f"timed out waiting for {what}: {last!r}")


class RequestLog:
    """WSGI middleware that remembers every request a stand-in answers, except its own
    `/_standin` inspection routes: `entries` of {"at" (epoch seconds on arrival), "method",
    "path", "status"}. Wrap with `app.wsgi_app = RequestLog(app.wsgi_app)`."""

    def __init__(self, wsgi_app, skip_prefix: str = "/_standin"):
        self.wsgi_app = wsgi_app
        self.skip_prefix = skip_prefix
        self.entries: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        at = time.time()
        path = environ.get("PATH_INFO", "")
        if path.startswith(self.skip_prefix):
            return self.wsgi_app(environ, start_response)

        def recording_start_response(status, headers, exc_info=None):
            with self._lock:
                self.entries.append({"at": at, "method": environ.get("REQUEST_METHOD"),
                                     "path": path, "status": int(status.split(" ", 1)[0])})
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, recording_start_response)
