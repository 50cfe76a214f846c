"""What a session needs before its first token: an engine, the task's prompt rendered and
tokenized (chat template or raw text), a title, the tree and its lock, and for a saved task
the check that its token ids mean the same thing for the model it is opened with.
``Session.create`` and ``Session.open`` are thin wrappers over :func:`new_task` and
:func:`open_task`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_tui.core.engine import open_engine
from steer_tui.core.engine_base import Engine
from steer_tui.core.sampling import Sampling, fresh_seed
from steer_tui.core.session_errors import ModelMismatch, SessionError
from steer_tui.core.store import Store, TaskLock
from steer_tui.core.tasks import ROLES, TITLE_MAX_CHARS
from steer_tui.core.tree import SteerTree, new_tree

__all__ = [
    "Prepared",
    "as_store",
    "build_prompt",
    "chat_messages",
    "check_messages",
    "check_model",
    "close_engine",
    "default_title",
    "load_engine",
    "new_task",
    "open_task",
]



def load_engine(model: Any, adapter: Any, n_ctx: int | None, seed: int | None) -> tuple[Engine, bool]:
    """(engine, owned). An Engine instance is used as is; otherwise a GGUF is loaded
    (``model`` None = the bundled default) and the session owns it."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if adapter is not None:
            raise SessionError("pass the adapter to open_engine() when you pass an engine object")
        return model, False
    kwargs: dict[str, Any] = {"adapter": adapter, "seed": seed}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    return open_engine(model, **kwargs), True


def close_engine(engine: Engine) -> None:
    """Close an engine the session loaded; a failure at shutdown is not worth an error."""
    try:
        engine.close()
    except (OSError, RuntimeError):  # pragma: no cover - best effort at shutdown
        pass


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a clean list of ``{role, content}`` dicts, or SessionError naming the bad one."""
    if not isinstance(messages, list) or not messages:
        raise SessionError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SessionError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SessionError(f"messages[{i}].role is {m['role']!r}; expected {', '.join(ROLES[:-1])} or {ROLES[-1]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_messages(prompt: str | None, messages: Any, system: str | None, raw: bool) -> list[dict[str, str]] | None:
    """The chat to render (None for a raw prompt), after checking the argument combination."""
    if (prompt is None) == (messages is None):
        raise SessionError("give exactly one of prompt= (text) or messages= (a chat)")
    if raw and (messages is not None or system is not None):
        raise SessionError("raw=True takes a prompt text only (no messages or system)")
    if prompt is not None and not isinstance(prompt, str):
        raise SessionError(f"prompt must be a string, got {type(prompt).__name__}")
    if messages is not None:
        msgs: list[dict[str, str]] | None = check_messages(messages)
    elif not raw:
        msgs = [{"role": "user", "content": prompt}]  # type: ignore[dict-item]
    else:
        msgs = None
    if system is not None and msgs is not None:
        if not isinstance(system, str):
            raise SessionError("system must be a string")
        msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
    return msgs


def build_prompt(engine: Engine, msgs: list[dict[str, str]] | None, raw_text: str | None) -> dict[str, Any]:
    """The tree's ``prompt`` object: ``msgs`` rendered with the model's chat template (or,
    when ``msgs`` is None, ``raw_text`` as is, control-token text parsed) and tokenized.
    Raises SessionError for an empty prompt or one that fills the context window."""
    if msgs is None:
        text = raw_text or ""
        tokens = engine.tokenize(text, add_bos=engine.add_bos, special=True)
        prompt_obj: dict[str, Any] = {"mode": "raw", "text": text, "tokens": tokens}
    else:
        text = engine.render_chat(msgs)
        tokens = engine.tokenize(text, add_bos=engine.add_bos, special=True)
        bos = engine.bos_id
        if engine.add_bos and bos is not None and len(tokens) > 1 and tokens[0] == tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote BOS itself
        prompt_obj = {"mode": "chat", "messages": msgs, "text": text, "tokens": tokens}
    if not tokens:
        raise SessionError("the prompt is empty")
    if len(tokens) >= engine.n_ctx:
        raise SessionError(
            f"the prompt has {len(tokens)} tokens; the context window holds {engine.n_ctx} "
            f"(raise n_ctx or shorten the prompt)"
        )
    return prompt_obj


def default_title(prompt_obj: dict[str, Any]) -> str:
    """A task title from its prompt: the raw text, or the first user message, on one line."""
    if prompt_obj["mode"] == "raw":
        first = prompt_obj["text"]
    else:
        first = next((m["content"] for m in prompt_obj["messages"] if m["role"] == "user"), "task")
    return " ".join(first.split())[:TITLE_MAX_CHARS] or "task"


def check_model(tree: SteerTree, engine: Engine, path: Path) -> str | None:
    """Raise ModelMismatch if token ids would mean something else; return a warning text
    if only the model file differs."""
    m = tree.model
    tv, ev = m.get("vocab_sha256"), engine.vocab_sha256
    if (tv and tv != ev) or (m.get("n_vocab") not in (None, engine.n_vocab)):
        raise ModelMismatch(
            f"{path}: the task was written with model {m.get('name')!r} whose vocabulary differs "
            f"from {engine.name!r} (n_vocab {m.get('n_vocab')} vs {engine.n_vocab}); its token ids "
            f"would be meaningless. Open it with --model {m.get('path')!r}"
        )
    if m.get("sha256") and m.get("sha256") != engine.sha256:
        return (
            f"task {tree.id!r} was written with model {m.get('name')!r} (sha256 {str(m.get('sha256'))[:12]}…); "
            f"continuing with {engine.name!r} (sha256 {engine.sha256[:12]}…), same vocabulary"
        )
    return None


@dataclass
class Prepared:
    """A task ready for a ``Session``: its store, tree, engine (and whether the session owns
    it), the task lock (None when read-only) and a model warning to show, if any."""

    store: Store
    tree: SteerTree
    engine: Engine
    owns_engine: bool
    lock: TaskLock | None
    warning: str | None = None


def as_store(store: Store | str | os.PathLike[str] | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def new_task(
    store: Store | str | os.PathLike[str] | None,
    *,
    prompt: str | None,
    messages: Any,
    system: str | None,
    raw: bool,
    model: Any,
    adapter: str | os.PathLike[str] | None,
    sampling: dict | Sampling | None,
    title: str | None,
    task_id: str | None,
    n_ctx: int | None,
) -> Prepared:
    """Check the arguments, load the engine, build the tree and take the lock (see
    ``Session.create``). Nothing is written yet; on failure nothing is held."""
    samp = Sampling.from_dict(sampling) if not isinstance(sampling, Sampling) else sampling
    if samp.seed is None:
        samp = samp.replace(seed=fresh_seed())
    msgs = chat_messages(prompt, messages, system, raw)
    st = as_store(store)
    engine, owned = load_engine(model, adapter, n_ctx, samp.seed)
    try:
        prompt_obj = build_prompt(engine, msgs, prompt)
        if title is None:
            title = default_title(prompt_obj)
        tid = task_id or st.new_task_id(title)
        if st.exists(tid):
            raise SessionError(f"task {tid!r} already exists in {st.root}; open it instead")
        tree = new_tree(task_id=tid, title=title, model=engine.describe(), prompt=prompt_obj, sampling=samp.to_dict())
        lock = st.lock(tid)
    except BaseException:
        if owned:
            close_engine(engine)
        raise
    return Prepared(st, tree, engine, owned, lock)


def open_task(
    store: Store | str | os.PathLike[str] | None,
    task_id: str | None,
    *,
    model: Any,
    read_only: bool,
    adapter: str | os.PathLike[str] | None,
    n_ctx: int | None,
) -> Prepared:
    """Load a saved task, lock it (unless ``read_only``), load the engine and check that it
    fits the tree (see ``Session.open``). On failure nothing is held."""
    if task_id is None:
        raise SessionError("task_id is required")
    st = as_store(store)
    tree = st.load(task_id)
    lock = None if read_only else st.lock(task_id)
    owned = False
    try:
        seed = tree.sampling.get("seed") if isinstance(tree.sampling, dict) else None
        engine, owned = load_engine(model, adapter, n_ctx, seed if isinstance(seed, int) else None)
        warning = check_model(tree, engine, st.task_path(task_id))
    except BaseException:
        if lock is not None:
            lock.release()
        if owned:
            close_engine(engine)
        raise
    return Prepared(st, tree, engine, owned, lock, warning)
