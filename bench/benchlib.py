"""What the benchmark scripts share: percentiles, the busiest window of a series of times,
/proc readings of a process, the machine's description, pt-BR numbers, the update of one section
of a doc, a JSON file of figures, and running ponte's real processes (Gunicorn, the poller) from
a checkout, with an RSS sampler and a watchdog that ends only what the bench started.
(Free ports and waiting come from standins.support, shared with the tests and the demo.)"""
from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in kB (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine(**extra) -> dict:
    """CPU count and model, Python version and the date (UTC), plus `extra`."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **extra}


def n(v: float, digits: int = 1) -> str:
    """pt-BR number: 1.234,5."""
    text = f"{v:,.{digits}f}"
    return text.replace(",", "X").replace(".", ",").replace("X", ".")


def update_doc(path: str, heading: str, section: str, intro: str = "# Benchmarks da ponte\n"):
    """Replace the section that starts with `heading` (up to the next `## ` heading) or append
    it; keep everything else. A missing file starts with `intro`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else intro
    pattern = re.compile(r"^" + re.escape(heading) + r"[^\n]*\n.*?(?=^## |\Z)", re.S | re.M)
    block = section.rstrip("\n") + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.rstrip("\n") + "\n")


# --- running ponte's real processes (web under Gunicorn, `python poller.py`) ------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Everything a bench started, so a watchdog or a failure can end exactly those processes.
started: list = []


def max_in_window(times: list[float], window_seconds: float = 1.0) -> int:
    """The most events that fall in any half-open window [t, t + window_seconds) of
    `times` (epoch seconds, any order): what a "N per sliding second" limit looks at."""
    ordered = sorted(times)
    best, first = 0, 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= window_seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(entry))
    return kids


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of `GET http://127.0.0.1:<port><path>`, or None when nothing answers."""
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def start_process(cmd: list[str], cwd: str, env: dict, log_path: str):
    """Popen `cmd` in its own session (so stopping it ends its children too), output appended
    to `log_path`; remembered in `started`."""
    import subprocess

    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()  # the child has its own copy of the descriptor
    started.append(proc)
    return proc


def stop_process(proc, timeout: float = 30) -> None:
    """SIGTERM, then after `timeout` SIGKILL to the process's own session (only what we
    started)."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(5)


def kill_started() -> None:
    """SIGKILL every process group in `started` that is still running."""
    import signal

    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass


def watchdog(seconds: float, name: str, on_fire=None) -> None:
    """Past `seconds`, whatever happens: `on_fire()`, kill what was started, exit 3."""
    import sys
    import threading

    def fire():
        print(f"{name}: passou de {seconds:.0f}s, encerrando", file=sys.stderr)
        try:
            if on_fire:
                on_fire()
        finally:
            kill_started()
            os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


class Gunicorn:
    """`python -m gunicorn -c gunicorn_conf.py [args] <app>` run from `cwd` (a checkout of
    ponte; the repository root by default), ready once `ready_path` answers and the workers
    exist."""

    def __init__(self, app_spec: str, env: dict, log_path: str, ready_path: str = "/",
                 cwd: str = ROOT, pythonpath: str | None = None, args: tuple[str, ...] = ()):
        import sys

        from standins.support import wait_for

        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn_conf.py", *args]
        if pythonpath:
            cmd += ["--pythonpath", pythonpath]
        cmd.append(app_spec)
        self.port = int(env["PORT"])
        self.proc = start_process(cmd, cwd, env, log_path)
        want = int(env.get("WEB_WORKERS", 2))
        try:
            wait_for(lambda: self.proc.poll() is None and http_status(self.port, ready_path), 30,
                     what=f"gunicorn {app_spec} na porta {self.port} (log: {log_path})")
            self.workers = wait_for(lambda: len(children_of(self.proc.pid)) >= want
                                    and children_of(self.proc.pid), 30, what=f"{want} workers")
        except BaseException:
            stop_process(self.proc)
            raise

    def pids(self) -> list[int]:
        """The master and its workers."""
        return [self.proc.pid] + children_of(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


class RssSampler:
    """Samples the summed VmRSS of a set of processes every 100 ms; remembers the largest sum
    and each process's VmHWM. `pids` is a callable so processes that appear later count too."""

    def __init__(self, pids):
        import threading

        self.pids = pids
        self.max_sum_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.wait(0.1):
            self.sample()

    def sample(self):
        """Read every process once."""
        total = 0
        for pid in self.pids():
            st = proc_status(pid)
            total += st.get("VmRSS", 0)
            if "VmHWM" in st:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), st["VmHWM"])
        self.max_sum_kb = max(self.max_sum_kb, total)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()
        self.sample()


def write_json(path: str, data) -> None:
    """`data` as indented JSON in `path` (folders created)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, sort_keys=True)
        fh.write("\n")
