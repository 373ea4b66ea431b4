"""Where results live: the latest run of each suite under a stable name, older runs in ``history.jsonl``.

``benchmarks/results/<stem>_<gpu>.json`` (e.g. ``e2e_h200.json``) holds the latest result of a suite on
one kind of GPU. Before a benchmark overwrites such a file, `archive` appends what it held as one
line of ``history.jsonl`` in the same folder, with the commit, date, GPU and command as columns and the
rest of the file (records, results, rows) carried whole, so a new run never loses an old measurement::

    path = stable_path("e2e", "NVIDIA H200")    # benchmarks/results/e2e_h200.json
    save_json(path, data, suite="end_to_end")   # archive(path), then an atomic write of data

Smoke runs (``meta.settings.smoke`` or ``meta.smoke``) are never archived: they measure nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from typing import Dict, Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join("benchmarks", "results")
HISTORY = "history.jsonl"
#: Columns every history line starts with; the rest of the line is the archived file's own content.
COLUMNS = ("suite", "kind", "file", "commit", "date", "gpu", "command")


def git_commit() -> Dict:
    """The commit that runs. ``FLASHNORM_GIT_COMMIT`` overrides git for copies of the tree whose git metadata
    is not theirs (e.g. a working tree copied to a remote GPU machine)."""
    given = os.environ.get("FLASHNORM_GIT_COMMIT", "").strip()
    if given:
        return {"commit": given, "dirty": None, "source": "FLASHNORM_GIT_COMMIT"}
    out = {}
    with contextlib.suppress(Exception):
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout
        out["dirty"] = bool(status.strip())
    return out


def describe(command: str, device: str) -> Dict:
    """The metadata block every benchmark writes: command, UTC date, GPU, versions, commit."""
    import torch

    return {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git": git_commit(),
    }


def gpu_tag(gpu: Optional[str]) -> str:
    """A file-name tag for a GPU name: ``"NVIDIA H200"`` → ``h200``, ``"NVIDIA A100-SXM4-80GB"`` → ``a100``."""
    if not gpu:
        return "cpu"
    model = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", gpu.upper().replace("NVIDIA", ""))
    return (model.group(1) if model else re.sub(r"[^a-z0-9]+", "", gpu.lower())).lower() or "gpu"


def stable_path(stem: str, gpu: Optional[str]) -> str:
    """``benchmarks/results/<stem>_<gpu tag>.json``: the latest result of one suite on one kind of GPU."""
    return os.path.join(RESULTS_DIR, f"{stem}_{gpu_tag(gpu)}.json")


def _meta(data: Dict) -> Dict:
    """A results file's metadata: ``meta`` (``env`` for the kernel benchmarks; a ``--repeat`` file's first run's)."""
    if isinstance(data.get("runs"), list) and data["runs"]:
        return _meta(data["runs"][0])
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else data.get("env")
    return meta if isinstance(meta, dict) else {}


def history_line(data: Dict, suite: str, file: str, kind: str = "results") -> Dict:
    """One history line from a results file's content: the columns, then its metadata and the rest whole
    (a record's ``gpu`` and ``run_date`` are dropped: they repeat the line's columns)."""
    meta = dict(_meta(data))
    commit = (meta.pop("git", None) or {}).get("commit")
    line = {"suite": suite, "kind": kind, "file": file, "commit": commit, "date": meta.pop("date", None),
            "gpu": meta.pop("gpu", None), "command": meta.pop("command", None), "meta": meta}
    for key, value in data.items():
        if key in ("meta", "env"):
            continue
        if key == "records":
            value = [{k: v for k, v in r.items() if k not in ("gpu", "run_date")} for r in value]
        line[key] = value
    return line


def read_history(path: str) -> Iterable[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def append_history(path: str, line: Dict) -> bool:
    """Appends ``line`` unless a line of the same file, commit and date is already there."""
    key = (line.get("file"), line.get("commit"), line.get("date"))
    if any((old.get("file"), old.get("commit"), old.get("date")) == key for old in read_history(path)):
        return False
    with open(path, "a") as fh:
        fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return True


def is_smoke(data: Dict) -> bool:
    meta = _meta(data)
    return bool(meta.get("smoke") or (meta.get("settings") or {}).get("smoke"))


def _run_key(data: Dict) -> tuple:
    meta = _meta(data)
    return (meta.get("git") or {}).get("commit"), meta.get("date")


def archive(path: str, suite: str, incoming: Optional[Dict] = None) -> bool:
    """Copies the result that ``path`` holds into ``history.jsonl`` beside it (the file itself stays until it
    is overwritten); False when there is nothing to archive: no file, unreadable, a smoke run, archived
    already, or the same run (commit and date) as ``incoming``, the data about to replace it."""
    if not os.path.exists(path):
        return False
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or is_smoke(data) or (incoming is not None and _run_key(data) == _run_key(incoming)):
        return False
    history = os.path.join(os.path.dirname(os.path.abspath(path)), HISTORY)
    return append_history(history, history_line(data, suite, os.path.basename(path)))


def save_json(path: str, data: Dict, suite: Optional[str] = None) -> None:
    """Atomic write of ``data`` to ``path``; with ``suite``, what ``path`` held is archived first."""
    if suite is not None:
        archive(path, suite, incoming=data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
