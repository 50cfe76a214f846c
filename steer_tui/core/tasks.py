"""The task queue file (``--tasks FILE.jsonl``): one task per line.

A line is ``{"prompt": "…"}`` or ``{"messages": [{"role": …, "content": …}, …]}`` with
optional ``"id"`` and ``"title"``. Blank lines and lines starting with ``#`` are skipped. A
bad line is reported by its line number and the rest are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The roles a chat message may have (queue lines and ``Session.create(messages=…)``).
ROLES = ("system", "user", "assistant")
#: A title made from a prompt keeps at most this many characters.
TITLE_MAX_CHARS = 60


class TaskQueueError(ValueError):
    """The whole file is unusable (missing, unreadable, or no valid line)."""


@dataclass
class TaskSpec:
    """One queued task. Exactly one of ``prompt`` / ``messages`` is set."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    id: str | None = None
    title: str | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def display_title(self) -> str:
        if self.title:
            return self.title
        text = self.prompt if self.prompt is not None else next(
            (m["content"] for m in reversed(self.messages or []) if m["role"] == "user"), ""
        )
        first = " ".join(text.split())
        return first[:TITLE_MAX_CHARS] + ("…" if len(first) > TITLE_MAX_CHARS else "")


def queue_task_id(spec_id: str | None, annotator: str | None) -> str | None:
    """The task id for a queue line with an ``"id"``: ``<id>-<annotator>`` so that two
    annotators working through one queue never produce the same task id (their stores
    merge into one training set), while one annotator reopening the queue finds their own
    tasks again. None when the line has no id (a fresh id is made)."""
    if not spec_id:
        return None
    from steer_tui.core.store import slugify

    who = slugify(annotator or "", max_len=24)
    return f"{spec_id}-{who}" if who else spec_id


def parse_task_line(raw: str, where: str) -> TaskSpec:
    """Parse one JSONL line; raises ValueError with ``where`` (file:line) in the message."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError(f"{where}: needs exactly one of \"prompt\" or \"messages\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: \"messages\" must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": string}}"
                )
        if not any(m["role"] == "user" for m in messages):
            raise ValueError(f"{where}: \"messages\" has no user message")
    for key in ("id", "title"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise ValueError(f"{where}: \"{key}\" must be a string")
    if obj.get("id"):
        from steer_tui.core.store import StoreError, check_task_id

        try:
            check_task_id(obj["id"])
        except StoreError as exc:
            raise ValueError(f"{where}: \"id\": {exc}") from None
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "id", "title")}
    return TaskSpec(
        prompt=prompt,
        messages=[{"role": m["role"], "content": m["content"]} for m in messages] if messages else None,
        id=obj.get("id"),
        title=obj.get("title"),
        extra=extra,
    )


def load_task_queue(path: str | os.PathLike[str]) -> tuple[list[TaskSpec], list[str]]:
    """Read a JSONL task file. Returns (tasks, errors); each error names file and line.

    Raises TaskQueueError if the file cannot be read or holds no valid task at all.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TaskQueueError(f"--tasks {p}: no such file") from None
    except OSError as exc:
        raise TaskQueueError(f"--tasks {p}: cannot read: {exc.strerror or exc}") from None
    tasks: list[TaskSpec] = []
    errors: list[str] = []
    for lineno, raw_bytes in enumerate(data.splitlines(), start=1):
        where = f"{p}:{lineno}"
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8 text")
            continue
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            spec = parse_task_line(raw, where)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        spec.line = lineno
        tasks.append(spec)
    if not tasks:
        detail = f" ({len(errors)} bad line{'s' if len(errors) != 1 else ''}: {errors[0]})" if errors else ""
        raise TaskQueueError(f"--tasks {p}: no usable task{detail}")
    return tasks, errors
