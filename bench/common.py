"""Stamp benchmark results with date, commit and machine; write JSON and print one line."""
from __future__ import annotations

import json
import os
import platform
import subprocess
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
