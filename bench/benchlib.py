"""What the benchmark scripts share: percentiles, /proc readings of a process, the machine's
description, pt-BR numbers and the update of one section of a doc. (Free ports and waiting come
from standins.support, shared with the tests and the demo.)"""
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
