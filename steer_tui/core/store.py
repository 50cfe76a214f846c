"""The task store: one steer-tree JSON file per task, written atomically, one writer per task.

Layout: ``<store>/tasks/<task-id>.json`` (+ ``<task-id>.lock`` while a session holds it).
The default store is ``$STEER_STORE`` or ``platformdirs.user_data_dir("steer-tui")``.

Guarantees (tested in tests/core/test_store.py and the fault tests):
- a save writes a temp file in the same directory, fsyncs it, renames it over the task file
  and fsyncs the directory, so a kill at any instant leaves the old or the new complete file;
- a task is locked with ``flock`` on its lock file: the kernel drops the lock when the holder
  dies, so a killed session never leaves a lock that blocks the next one;
- task ids are safe file names, whatever the title holds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import sys
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from steer_tui.core.tree import SteerTree, TreeError

try:  # POSIX; on other platforms locking degrades to "no lock" with a warning in TaskLock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: Largest task file loaded, in MiB, unless ``$STEER_MAX_TREE_MB`` says otherwise.
DEFAULT_MAX_TREE_MB = 64
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(Exception):
    """A store operation failed; the message names the path and what is wrong."""


class TaskLocked(StoreError):
    """Another live session holds the task. ``holder`` describes it (pid, host, since)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def max_tree_bytes() -> int:
    """The size limit for a task file: ``$STEER_MAX_TREE_MB`` (read now) or the default, in bytes."""
    raw = os.environ.get("STEER_MAX_TREE_MB") or str(DEFAULT_MAX_TREE_MB)
    try:
        return int(raw) * 1024 * 1024
    except ValueError:
        raise StoreError(f"$STEER_MAX_TREE_MB is {raw!r}; expected a whole number of MiB") from None


def default_store_dir() -> Path:
    env = os.environ.get("STEER_STORE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("steer-tui"))


def check_task_id(task_id: str) -> str:
    """Return ``task_id`` if it is a safe file name stem, else raise StoreError."""
    if not isinstance(task_id, str) or not _TASK_ID_RE.match(task_id) or ".." in task_id:
        raise StoreError(
            f"task id {task_id!r} is not valid: use letters, digits, '.', '_' and '-' "
            f"(at most 128 characters, not starting with '.' or '-', no '..')"
        )
    return task_id


def unique_task_id(task_id: str, taken: Container[str]) -> str:
    """``task_id`` if it is not ``taken``, else the first free ``<id>.<k>`` for k = 2, 3, ...

    Two annotators' stores can hold the same task id (a shared ``--tasks`` queue); where
    their trees meet (export, training data) later ones are renamed with this, so that
    (task id, node id) stays a unique key."""
    if task_id not in taken:
        return task_id
    k = 2
    while f"{task_id}.{k}" in taken:
        k += 1
    return f"{task_id}.{k}"


def slugify(title: str, max_len: int = 40) -> str:
    """A file-name-safe slug of ``title`` (ASCII letters/digits and '-'), maybe empty."""
    s = re.sub(r"[^a-z0-9]+", "-", title.lower().encode("ascii", "ignore").decode("ascii"))
    return s.strip("-")[:max_len].strip("-")


# ---------------------------------------------------------------------------------------
# files


def load_tree(path: str | os.PathLike[str]) -> SteerTree:
    """Read and validate a steer-tree file. Errors name the file (and node and rule)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"{p}: no such task file") from None
    except OSError as exc:
        raise StoreError(f"{p}: cannot read: {exc.strerror or exc}") from None
    limit = max_tree_bytes()
    if size > limit:
        raise StoreError(
            f"{p}: file is {size / 2**20:.0f} MiB, over the {limit // 2**20} MiB limit for a "
            f"task file (set STEER_MAX_TREE_MB to raise it)"
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise StoreError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise StoreError(f"{p}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise StoreError(f"{p}: JSON is nested too deeply") from None
    return SteerTree.from_dict(data, source=str(p))


def dumps_tree(tree: SteerTree) -> str:
    """Serialise a tree: one top-level field per line and one node per line (readable,
    diffable, compact; long token lists never spread over thousands of lines)."""
    d = tree.to_dict()
    nodes = d.pop("nodes")

    def one(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False, separators=(", ", ": "))

    lines = [f"  {json.dumps(k)}: {one(v)}" for k, v in d.items()]
    node_lines = ",\n".join("    " + json.dumps(n, ensure_ascii=False, separators=(",", ":")) for n in nodes)
    lines.append('  "nodes": [\n' + node_lines + "\n  ]" if nodes else '  "nodes": []')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_tree(tree: SteerTree, path: str | os.PathLike[str]) -> None:
    """Atomically replace ``path`` with ``tree``: temp file, fsync, rename, fsync dir.

    On failure (disk full, permission, read-only) the old file is untouched, the temp file
    is removed, and StoreError says why; the caller keeps its in-memory tree and may retry.
    """
    p = Path(path)
    data = dumps_tree(tree).encode("utf-8")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system"}.get(
            exc.errno, exc.strerror or str(exc)
        )
        raise StoreError(f"could not save {p}: {reason}") from exc


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (model and adapter provenance), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# locking


class TaskLock:
    """An exclusive, process-lifetime lock on one task (flock on ``<id>.lock``)."""

    def __init__(self, path: Path, task_id: str) -> None:
        self.path = path
        self.task_id = task_id
        self._fd: int | None = None

    def acquire(self) -> TaskLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {self.path}: {exc.strerror or exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
                since = holder.get("since")
                raise TaskLocked(
                    f"task {self.task_id!r} is open in another session ({who}"
                    f"{', since ' + since if since else ''}); close it there, or open this one read-only",
                    holder,
                ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": sys.argv[:3],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _remove_stale_temp_files(self.path.parent, self.task_id)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> TaskLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except (OSError, AttributeError, TypeError):  # closed fd; modules torn down at exit
            pass


def _remove_stale_temp_files(directory: Path, task_id: str) -> None:
    """Delete temp files that a killed writer of this task left behind (``save_tree``
    names them ``.<id>.json.<pid>.<rand>.tmp``). We hold the task's lock, so no live writer
    of this task can be using one; a file of a pid that is still alive (and is not us) is
    kept anyway, in case it writes without the lock."""
    for tmp in directory.glob(f".{task_id}.json.*.tmp"):
        try:
            pid = int(tmp.name[len(task_id) + 7 :].split(".")[0])
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# the store


@dataclass
class TaskInfo:
    """A row of ``steer-tui list``. ``error`` is set (and the rest may be blank) for a
    task file that does not load."""

    id: str
    path: Path
    title: str = ""
    updated_at: str = ""
    n_nodes: int = 0
    n_steers: int = 0
    n_response_tokens: int = 0
    accepted: int = 0
    error: str | None = None


class Store:
    """A directory of task files."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self.tasks_dir = self.root / "tasks"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def task_path(self, task_id: str) -> Path:
        return self.tasks_dir / f"{check_task_id(task_id)}.json"

    def exists(self, task_id: str) -> bool:
        return self.task_path(task_id).exists()

    def new_task_id(self, title: str = "") -> str:
        """``YYYYMMDD-<slug>-<4 hex>``: sortable, readable, unique in this store."""
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        slug = slugify(title) or "task"
        while True:
            tid = f"{day}-{slug}-{secrets.token_hex(2)}"
            if not self.task_path(tid).exists():
                return tid

    def list_tasks(self) -> list[TaskInfo]:
        if not self.tasks_dir.is_dir():
            return []
        out = []
        for p in sorted(self.tasks_dir.glob("*.json")):
            tid = p.stem
            try:
                tree = load_tree(p)
            except (StoreError, TreeError) as exc:
                out.append(TaskInfo(id=tid, path=p, error=str(exc)))
                continue
            out.append(
                TaskInfo(
                    id=tree.id,
                    path=p,
                    title=tree.title,
                    updated_at=tree.updated_at,
                    n_nodes=len(tree.nodes),
                    n_steers=len(tree.steers()),
                    n_response_tokens=sum(len(n.tokens) for n in tree.nodes),
                    accepted=len(tree.accepted),
                )
            )
        out.sort(key=lambda t: (t.updated_at, t.id), reverse=True)
        return out

    def load(self, task_id: str) -> SteerTree:
        return load_tree(self.task_path(task_id))

    def save(self, tree: SteerTree) -> Path:
        path = self.task_path(tree.id)
        save_tree(tree, path)
        return path

    def lock(self, task_id: str) -> TaskLock:
        """Take the task's lock now (raises TaskLocked if a live session holds it)."""
        return TaskLock(self.tasks_dir / f"{check_task_id(task_id)}.lock", task_id).acquire()
