"""What the demo, the tests and the benchmarks share when they run ponte next to the stand-ins:
a free local port, and waiting for something another process or thread does."""
from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
