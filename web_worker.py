"""Gunicorn worker of ponte's web process: Gunicorn's sync worker, except that a request is read
whole — headers and body, under deadlines and size limits, many connections at once on a
non-blocking loop — before the worker runs the app for it.

Why: a sync worker reads a request with blocking calls, so one client that trickles its headers
or its body holds the worker until Gunicorn's timeout kills it; two such clients held both
workers and every Kommo ack waited ~30 s (issue 14). Here a slow client only holds a buffer.
The app still runs one request at a time per worker, in the worker's main thread, exactly as
under the sync worker (same parser, same WSGI environ, same access log, same hooks); only the
close differs: the request was read whole, so the worker closes at once instead of waiting up to
2 s for the client to close first (bench/bench_slow_clients.py, docs/benchmarks.md).

Owns: accepting connections, buffering each request until it is complete (`RequestReader`),
dropping clients that are too slow (408), too many or holding too much (503) or sending too much
(413/431), reporting the drops (`slow_clients_dropped`), and handing complete requests to the
sync worker's `handle`. Must not: run the app for an incomplete request, parse
HTTP beyond what it takes to know where a request ends (Gunicorn's parser judges the request),
or know anything about ponte's routes.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import socket
import time

from gunicorn.workers.sync import SyncWorker

log = logging.getLogger("ponte.web_worker")

# What RequestReader.feed returns.
NEED_MORE = "need_more"
COMPLETE = "complete"
PASS_ON = "pass_on"  # malformed or declared too large: Gunicorn's parser / the app answer it
HEADERS_TOO_LARGE = "headers_too_large"
BODY_TOO_LARGE = "body_too_large"

HEADER_TIMEOUT_SECONDS = 10.0  # from accept to the end of the headers
BODY_TIMEOUT_SECONDS = 20.0  # from the end of the headers to the end of the body
WRITE_TIMEOUT_SECONDS = 10.0  # a client that does not read its answer
MAX_HEADER_BYTES = 64 * 1024
# All the requests one worker holds while they arrive: past this, the one with the most bytes is
# refused (503), so clients that send almost-whole large bodies cannot use up the memory.
MAX_BUFFERED_BYTES = 16 * 1024 * 1024
MAX_CHUNK_LINE_BYTES = 4096
DROP_REPORT_EVERY_SECONDS = 60.0
SWEEP_EVERY_SECONDS = 0.25
DEFER_ACCEPT_SECONDS = 5

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LISTENER, _WAKEUP = object(), object()


def _plain_answer(status: int, reason: str, code: str) -> bytes:
    body = ('{"error": "%s"}' % code).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


ANSWER_TIMEOUT = _plain_answer(408, "Request Timeout", "request_timeout")
ANSWER_BUSY = _plain_answer(503, "Service Unavailable", "too_many_pending_requests")
ANSWER_BODY_TOO_LARGE = _plain_answer(413, "Content Too Large", "payload_too_large")
ANSWER_HEADERS_TOO_LARGE = _plain_answer(431, "Request Header Fields Too Large",
                                         "headers_too_large")


class RequestReader:
    """The bytes of one HTTP/1.x request as they arrive, and whether they are all there: the end
    of the headers, then `Content-Length` bytes or a chunked body up to its last chunk and
    trailers. Incremental: a body trickled in tiny pieces is scanned once."""

    def __init__(self, max_body_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES):
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.buffer = bytearray()
        self.head_end: int | None = None
        self.expects_continue = False
        self._searched = 0
        self._body_length: int | None = None
        self._chunked = False
        self._chunk_pos = 0
        self._chunk_bytes = 0
        self._in_trailers = False

    def feed(self, data: bytes) -> str:
        """Add `data`; NEED_MORE, COMPLETE, PASS_ON (hand it over as it is: Gunicorn's parser
        or the app refuse it), HEADERS_TOO_LARGE or BODY_TOO_LARGE."""
        self.buffer += data
        if self.head_end is None:
            end = self.buffer.find(b"\r\n\r\n", max(0, self._searched - 3))
            if end < 0:
                self._searched = len(self.buffer)
                return HEADERS_TOO_LARGE if len(self.buffer) > self.max_header_bytes \
                    else NEED_MORE
            if end + 4 > self.max_header_bytes:
                return HEADERS_TOO_LARGE
            self.head_end = end + 4
            verdict = self._read_head(bytes(self.buffer[:end]))
            if verdict is not None:
                return verdict
        if self._chunked:
            return self._scan_chunks()
        return COMPLETE if len(self.buffer) - self.head_end >= self._body_length else NEED_MORE

    def _read_head(self, head: bytes) -> str | None:
        lines = head.split(b"\r\n")
        http11 = lines[0].rstrip().endswith(b"HTTP/1.1")
        lengths, codings = [], []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return PASS_ON
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif name == b"expect":
                self.expects_continue = http11 and value.lower() == b"100-continue"
        if codings:
            if lengths or codings[-1] != b"chunked":
                return PASS_ON  # ambiguous framing: Gunicorn refuses it
            self._chunked, self._chunk_pos = True, self.head_end
            return None
        if len(set(lengths)) > 1 or (lengths and not lengths[0].isdigit()):
            return PASS_ON  # bytes.isdigit is ASCII-only
        self._body_length = int(lengths[0]) if lengths else 0
        if self._body_length > self.max_body_bytes:
            return PASS_ON  # the app answers 413 without reading the body
        return None

    def _scan_chunks(self) -> str:
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n", self._chunk_pos)
            if line_end < 0:
                return BODY_TOO_LARGE if len(buf) - self._chunk_pos > MAX_CHUNK_LINE_BYTES \
                    else NEED_MORE
            if self._in_trailers:
                if line_end == self._chunk_pos:
                    return COMPLETE  # the empty line after the last chunk (and its trailers)
                if line_end - self.head_end > self.max_body_bytes + self.max_header_bytes:
                    return BODY_TOO_LARGE
                self._chunk_pos = line_end + 2
                continue
            size_text = bytes(buf[self._chunk_pos:line_end]).split(b";", 1)[0].strip()
            if not size_text or not set(size_text) <= _HEX:
                return PASS_ON
            size = int(size_text, 16)
            if size == 0:
                self._in_trailers, self._chunk_pos = True, line_end + 2
                continue
            if self._chunk_bytes + size > self.max_body_bytes:
                return BODY_TOO_LARGE
            next_pos = line_end + 2 + size + 2
            if len(buf) < next_pos:
                return NEED_MORE
            self._chunk_bytes += size
            self._chunk_pos = next_pos


class BufferedClient:
    """The client socket as the sync worker sees it once the request is read whole: `recv`
    returns the buffered request (then end of data), everything else is the real socket. The
    `100 Continue` Gunicorn sends was already sent while the body was read, so it is dropped."""

    def __init__(self, sock: socket.socket, data: bytes, continue_sent: bool):
        self._sock = sock
        self._data = memoryview(data)
        self._pos = 0
        self._drop_continue = continue_sent

    def recv(self, size: int) -> bytes:
        chunk = self._data[self._pos:self._pos + size].tobytes()
        self._pos += len(chunk)
        return chunk

    def send(self, data) -> int:
        if self._drop_continue and bytes(data) == _CONTINUE:
            self._drop_continue = False
            return len(data)
        return self._sock.send(data)

    def sendall(self, data) -> None:
        if self._drop_continue and bytes(data) == _CONTINUE:
            self._drop_continue = False
            return
        self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Pending:
    __slots__ = ("sock", "fd", "addr", "listener", "reader", "deadline", "continue_sent",
                 "registered", "done")

    def __init__(self, sock, addr, listener, reader, deadline):
        self.sock, self.addr, self.listener, self.reader = sock, addr, listener, reader
        self.fd = sock.fileno()
        self.deadline = deadline
        self.continue_sent = False
        self.registered = False
        self.done = False  # dispatched or closed: an event already selected for it is stale


class BufferingWorker(SyncWorker):
    """The sync worker with a non-blocking front: accepts every connection, buffers each request
    until it is complete (or drops it: past its deadline 408, too large 413/431, the oldest one
    with 503 when `worker_connections` are pending or `max_buffered_bytes` are held), then runs
    it through `SyncWorker.handle`. Configure with `buffering_worker_class(...)`."""

    max_body_bytes = 1_048_576
    header_timeout_seconds = HEADER_TIMEOUT_SECONDS
    body_timeout_seconds = BODY_TIMEOUT_SECONDS
    write_timeout_seconds = WRITE_TIMEOUT_SECONDS
    max_buffered_bytes = MAX_BUFFERED_BYTES
    drop_report_every_seconds = DROP_REPORT_EVERY_SECONDS

    def run(self):
        if self.cfg.is_ssl:  # TLS ends before ponte (EasyPanel / a proxy); keep Gunicorn's path
            return super().run()
        for listener in self.sockets:
            listener.setblocking(False)
            _defer_accept(listener)
        self._selector = selectors.DefaultSelector()
        for listener in self.sockets:
            self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self.PIPE[0], selectors.EVENT_READ, _WAKEUP)
        self._pending: dict[int, _Pending] = {}  # by fd; insertion order = oldest first
        self._max_pending = self._pending_capacity()
        self._buffered_bytes = 0
        self._dropped = {"timeout": 0, "capacity": 0, "too_large": 0}
        self._report_at = time.monotonic() + self.drop_report_every_seconds
        self._sweep_at = 0.0
        try:
            self._loop()
        finally:
            for pending in list(self._pending.values()):
                self._close(pending)
            self._selector.close()

    def _pending_capacity(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = soft - 64 if soft != resource.RLIM_INFINITY else self.cfg.worker_connections
        return max(1, min(self.cfg.worker_connections, room))

    def _loop(self) -> None:
        while self.alive:
            self.notify()
            for key, _events in self._selector.select(timeout=0.5):
                if key.data is _LISTENER:
                    self._accept_from(key.fileobj)
                elif key.data is _WAKEUP:
                    try:
                        while os.read(self.PIPE[0], 64):
                            pass
                    except OSError:  # drained (EAGAIN)
                        pass
                else:
                    self._read(key.data)
                if not self.alive:
                    return
            now = time.monotonic()
            if now >= self._sweep_at:  # not on every event: many may be pending under load
                self._sweep_at = now + SWEEP_EVERY_SECONDS
                self._drop_expired(now)
                self._report_drops(now)
            if not self.is_parent_alive():
                return

    def _accept_from(self, listener) -> None:
        # One connection per wake-up, as the sync worker takes one at a time: a worker that
        # took every waiting connection at once would serve them one after the other while the
        # other worker sat idle (the select is level-triggered: the rest wait for the next turn).
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                return
            raise
        client.setblocking(False)
        while len(self._pending) >= self._max_pending:
            self._drop(self._pending[next(iter(self._pending))], ANSWER_BUSY, "capacity")
        pending = _Pending(client, addr, listener, RequestReader(self.max_body_bytes),
                           time.monotonic() + self.header_timeout_seconds)
        self._pending[pending.fd] = pending
        self._read(pending)  # a small request is often there already: no select round

    def _read(self, pending: _Pending) -> None:
        if pending.done:
            return
        try:
            data = pending.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            if not pending.registered:
                self._selector.register(pending.sock, selectors.EVENT_READ, pending)
                pending.registered = True
            return
        except OSError:
            self._close(pending)
            return
        if not data:  # the client gave up before its request was complete
            self._close(pending)
            return
        reader = pending.reader
        had_head = reader.head_end is not None
        try:
            verdict = reader.feed(data)
        except Exception:  # a bug here must not end the worker: Gunicorn's parser judges
            log.exception("request_reader_failed")
            verdict = PASS_ON
        self._buffered_bytes += len(data)
        if verdict == NEED_MORE:
            if not had_head and reader.head_end is not None:
                pending.deadline = time.monotonic() + self.body_timeout_seconds
                if reader.expects_continue and not pending.continue_sent:
                    self._send_quietly(pending.sock, _CONTINUE)
                    pending.continue_sent = True
            if not pending.registered:
                self._selector.register(pending.sock, selectors.EVENT_READ, pending)
                pending.registered = True
            if self._buffered_bytes > self.max_buffered_bytes:
                largest = max(self._pending.values(), key=lambda p: len(p.reader.buffer))
                self._drop(largest, ANSWER_BUSY, "capacity")
        elif verdict == HEADERS_TOO_LARGE:
            self._drop(pending, ANSWER_HEADERS_TOO_LARGE, "too_large")
        elif verdict == BODY_TOO_LARGE:
            self._drop(pending, ANSWER_BODY_TOO_LARGE, "too_large")
        else:  # COMPLETE or PASS_ON
            self._dispatch(pending)

    def _dispatch(self, pending: _Pending) -> None:
        self._forget(pending)
        sock = pending.sock
        try:
            sock.setblocking(True)
            sock.settimeout(self.write_timeout_seconds)
        except OSError:
            sock.close()
            return
        client = BufferedClient(sock, bytes(pending.reader.buffer), pending.continue_sent)
        self.handle(pending.listener, client, pending.addr)

    def _drop_expired(self, now: float) -> None:
        late = [p for p in self._pending.values() if p.deadline <= now]
        for pending in late:
            self._drop(pending, ANSWER_TIMEOUT, "timeout")

    def _drop(self, pending: _Pending, answer: bytes, why: str) -> None:
        self._dropped[why] += 1
        self._send_quietly(pending.sock, answer)
        self._close(pending)

    def _report_drops(self, now: float) -> None:
        if now < self._report_at:
            return
        self._report_at = now + self.drop_report_every_seconds
        if any(self._dropped.values()):
            log.warning("slow_clients_dropped", extra={
                "dropped_timeout": self._dropped["timeout"],
                "dropped_capacity": self._dropped["capacity"],
                "dropped_too_large": self._dropped["too_large"],
                "pending_connections": len(self._pending),
                "window_seconds": self.drop_report_every_seconds})
            self._dropped = dict.fromkeys(self._dropped, 0)

    @staticmethod
    def _send_quietly(sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)  # non-blocking, best effort: a few bytes fit in any socket buffer
        except OSError:
            pass

    def _forget(self, pending: _Pending) -> None:
        pending.done = True
        if self._pending.get(pending.fd) is pending:  # the fd may belong to a newer one by now
            del self._pending[pending.fd]
            self._buffered_bytes -= len(pending.reader.buffer)
        if pending.registered:
            try:
                self._selector.unregister(pending.sock)
            except (KeyError, ValueError):
                pass
            pending.registered = False

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        try:
            pending.sock.close()
        except OSError:
            pass


def _defer_accept(listener) -> None:
    """Linux: accept() only once the client has sent something (or after a few seconds), so a
    small request is usually whole at the first recv — no extra select round, no cost over the
    sync worker — and a client that connects and stays silent never reaches the worker early."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        listener.setsockopt(socket.IPPROTO_TCP, option, int(DEFER_ACCEPT_SECONDS))
    except OSError:
        pass  # an optimisation only


def buffering_worker_class(max_body_bytes: int,
                           header_timeout_seconds: float = HEADER_TIMEOUT_SECONDS,
                           body_timeout_seconds: float = BODY_TIMEOUT_SECONDS,
                           write_timeout_seconds: float = WRITE_TIMEOUT_SECONDS,
                           max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                           drop_report_every_seconds: float = DROP_REPORT_EVERY_SECONDS) -> type:
    """A `BufferingWorker` with these limits, for gunicorn_conf's `worker_class`."""
    return type("BufferingWorker", (BufferingWorker,), {
        "max_body_bytes": max_body_bytes, "header_timeout_seconds": header_timeout_seconds,
        "body_timeout_seconds": body_timeout_seconds,
        "write_timeout_seconds": write_timeout_seconds,
        "max_buffered_bytes": max_buffered_bytes,
        "drop_report_every_seconds": drop_report_every_seconds, "__module__": __name__})
