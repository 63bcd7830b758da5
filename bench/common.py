"""Stamp benchmark results with date, commit and machine; write JSON; refuse to resume a file of other settings."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time


def stamp() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                                    capture_output=True, text=True).stdout.strip())  # results being written are not the code
    except OSError:
        commit, dirty = "unknown", False
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit + ("+dirty" if dirty else ""),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"}


def write_result(name: str, result: dict) -> str:
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/{name}.json"
    with open(path, "w") as f:
        json.dump({**stamp(), **result}, f, indent=1)
    return path


def other_settings(path: str, recorded: dict, asked: dict, what_to_do: str) -> bool:
    """Whether a results file to resume was made with other settings; if so, one line on stderr names each
    difference and `what_to_do` (the caller then exits 2, before anything starts)."""
    differ = [f"{k}: {recorded.get(k)!r} there, {v!r} now" for k, v in asked.items() if recorded.get(k) != v]
    if differ:
        print(f"error: {path} holds runs of other settings ({'; '.join(differ)}): {what_to_do}", file=sys.stderr)
    return bool(differ)
