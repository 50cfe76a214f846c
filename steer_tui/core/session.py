"""The headless steering session: a task's tree, an engine and a position in the tree.

The TUI, ``steer-tui auto`` and scripts all drive a ``Session``; see docs/session.md.

Position model
--------------
The session's current path runs from the prompt through a chain of nodes to ``end`` (a
node id, or ``None`` = nothing after the prompt). Rollbacks split nodes, so the position is
always the end of a whole node. ``cut`` is the child of ``end`` that the last rollback cut
away (still in the tree): the next ``correct``/``pick`` replaces it (a steer), the next
``generate`` becomes its sibling (a resample).

Saving
------
Every mutation a user would mind losing (generation end, steer, rollback, accept, undo,
redo) saves atomically through the store. A failed save raises ``SaveError`` *after* the
in-memory change is made; the state is kept, ``dirty`` stays True and the next save retries.
The position is stored in the file under the extra key ``"session"`` so that
``Session.open`` continues exactly where the last session stopped.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steer_tui.core.engine import Engine, EngineError, Sampling, Step
from steer_tui.core.store import Store, StoreError, TaskLock, TaskLocked
from steer_tui.core.text import TextDecoder
from steer_tui.core.tree import Node, SteerTree, TreeError, new_tree

__all__ = [
    "ModelMismatch",
    "ModelMismatchWarning",
    "SaveError",
    "Session",
    "SessionBusy",
    "SessionError",
    "TaskLocked",
    "Token",
    "TokenInfo",
]

#: How many alternatives are recorded per token (SPEC: k >= 5).
TOP_K = 5
_POSITION_KEY = "session"


class SessionError(Exception):
    """A session operation is not possible now (clear message for the user)."""


class SessionBusy(SessionError):
    """A generation is running; pause it (set the stop event) before changing the tree."""


class ModelMismatch(SessionError):
    """The tree was made with a model whose vocabulary differs: its token ids are meaningless here."""


class ModelMismatchWarning(UserWarning):
    """The model file differs from the tree's (same vocabulary): continuing is allowed."""


class SaveError(SessionError):
    """Saving failed (disk full, permission...). The in-memory state is intact; retry with save()."""


@dataclass(frozen=True)
class Token:
    """One generated token as ``Session.generate`` yields it. ``index`` is its position in
    the response (0 = first token after the prompt); ``text`` is its UTF-8-safe piece."""

    id: int
    text: str
    logprob: float
    top: list[tuple[int, float]]
    index: int


@dataclass(frozen=True)
class TokenInfo:
    """One token of the current path, for the UI: where it lives (``node_id``, ``offset``
    inside the node) and what it is. ``text`` pieces concatenate to the response text."""

    index: int
    node_id: str
    offset: int
    id: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]] | None
    author: str
    kind: str


def _engine_model_info(engine: Engine) -> dict[str, Any]:
    if hasattr(engine, "describe"):
        return engine.describe()  # type: ignore[no-any-return]
    return {
        "name": engine.name,
        "path": engine.path,
        "sha256": engine.sha256,
        "n_vocab": engine.n_vocab,
        "vocab_sha256": engine.vocab_sha256,
        "eos_ids": list(engine.eos_ids),
        "adapter": engine.adapter,
    }


def _as_store(store: Store | str | os.PathLike[str] | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _load_engine(model: Any, adapter: Any, n_ctx: int | None, seed: int | None) -> tuple[Engine, bool]:
    """(engine, owned). An Engine instance is used as is; otherwise a GGUF is loaded."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if adapter is not None:
            raise SessionError("pass the adapter to open_engine() when you pass an engine object")
        return model, False
    from steer_tui.core.engine import open_engine

    kwargs: dict[str, Any] = {"adapter": adapter, "seed": seed}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    return open_engine(model, **kwargs), True


class Session:
    """Steer one task. Build with ``Session.create`` or ``Session.open``; use as a context
    manager (or call ``close()``) to release the task lock."""

    def __init__(
        self,
        *,
        store: Store,
        tree: SteerTree,
        engine: Engine,
        owns_engine: bool = False,
        lock: TaskLock | None = None,
        annotator: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.tree = tree
        self.engine = engine
        self.annotator = annotator
        self.read_only = read_only
        self.sampling = Sampling.from_dict(tree.sampling)
        self.last_end: str | None = None
        #: True while the tree has changes that are not on disk (e.g. after a failed save).
        self.dirty = False
        #: Seconds between checkpoint saves during a long generation (it is saved at its end anyway).
        self.autosave_interval = 10.0
        self.warnings: list[str] = []
        self._owns_engine = owns_engine
        self._lock_handle = lock
        self._mu = threading.RLock()
        self._generating = False
        self._end: str | None = None
        self._cut: str | None = None
        self._new_branch = False
        self._redo: list[tuple[str, str | None]] = []  # (undone node id, position before undo)
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        store: Store | str | os.PathLike[str] | None = None,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        raw: bool = False,
        model: Any = None,
        adapter: str | os.PathLike[str] | None = None,
        sampling: dict | Sampling | None = None,
        title: str | None = None,
        task_id: str | None = None,
        annotator: str | None = None,
        n_ctx: int | None = None,
    ) -> Session:
        """Start a new task: render the prompt (chat template unless ``raw``), tokenize it,
        write the file and take the task lock.

        ``prompt`` is a user message (or, with ``raw=True``, the exact text the model sees,
        control tokens such as ``<|im_start|>`` included); ``messages`` is a full chat;
        ``system`` adds a system message. ``sampling.seed=None`` draws a seed, which is
        recorded so the task can be reproduced. ``model`` is None (bundled default), a
        GGUF path or an Engine object (not closed by the session)."""
        samp = Sampling.from_dict(sampling) if not isinstance(sampling, Sampling) else sampling
        if samp.seed is None:
            samp = samp.replace(seed=secrets.randbits(31))
        if (prompt is None) == (messages is None):
            raise SessionError("give exactly one of prompt= (text) or messages= (a chat)")
        if raw and (messages is not None or system is not None):
            raise SessionError("raw=True takes a prompt text only (no messages or system)")
        if prompt is not None and not isinstance(prompt, str):
            raise SessionError(f"prompt must be a string, got {type(prompt).__name__}")
        if messages is not None:
            msgs = _check_messages(messages)
        elif not raw:
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = None
        if system is not None and msgs is not None:
            if not isinstance(system, str):
                raise SessionError("system must be a string")
            msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
        st = _as_store(store)
        engine, owned = _load_engine(model, adapter, n_ctx, samp.seed)
        try:
            if raw:
                text = prompt or ""
                tokens = engine.tokenize(text, add_bos=bool(getattr(engine, "add_bos", False)), special=True)
                prompt_obj: dict[str, Any] = {"mode": "raw", "text": text, "tokens": tokens}
            else:
                text = engine.render_chat(msgs)
                bos_id = getattr(engine, "bos_id", None)
                add_bos = bool(getattr(engine, "add_bos", False))
                tokens = engine.tokenize(text, add_bos=add_bos, special=True)
                if add_bos and bos_id is not None and len(tokens) > 1 and tokens[0] == tokens[1] == bos_id:
                    tokens = tokens[1:]  # the template wrote BOS itself
                prompt_obj = {"mode": "chat", "messages": msgs, "text": text, "tokens": tokens}
            if not tokens:
                raise SessionError("the prompt is empty")
            if len(tokens) >= engine.n_ctx:
                raise SessionError(
                    f"the prompt has {len(tokens)} tokens; the context window holds {engine.n_ctx} "
                    f"(raise n_ctx or shorten the prompt)"
                )
            if title is None:
                first = prompt if prompt is not None else next(
                    (m["content"] for m in msgs or [] if m["role"] == "user"), "task"
                )
                title = " ".join(first.split())[:60] or "task"
            tid = task_id or st.new_task_id(title)
            if st.exists(tid):
                raise SessionError(f"task {tid!r} already exists in {st.root}; open it instead")
            tree = new_tree(
                task_id=tid,
                title=title,
                model=_engine_model_info(engine),
                prompt=prompt_obj,
                sampling=samp.to_dict(),
            )
            lock = st.lock(tid)
        except BaseException:
            if owned:
                _close_engine(engine)
            raise
        s = cls(store=st, tree=tree, engine=engine, owns_engine=owned, lock=lock, annotator=annotator)
        try:
            s.save()
        except SaveError:
            s.close()
            raise
        return s

    @classmethod
    def open(
        cls,
        store: Store | str | os.PathLike[str] | None = None,
        task_id: str | None = None,
        model: Any = None,
        read_only: bool = False,
        annotator: str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        n_ctx: int | None = None,
    ) -> Session:
        """Continue a saved task where it stopped. The model's vocabulary must match the
        tree's (else ``ModelMismatch``); a different model file with the same vocabulary only
        warns (``ModelMismatchWarning``, also listed in ``session.warnings``). Raises
        ``TaskLocked`` if another session holds the task, unless ``read_only``."""
        if task_id is None:
            raise SessionError("task_id is required")
        st = _as_store(store)
        tree = st.load(task_id)
        lock = None if read_only else st.lock(task_id)
        try:
            seed = tree.sampling.get("seed") if isinstance(tree.sampling, dict) else None
            engine, owned = _load_engine(model, adapter, n_ctx, seed if isinstance(seed, int) else None)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            warn = _check_model(tree, engine, st.task_path(task_id))
        except BaseException:
            if lock is not None:
                lock.release()
            if owned:
                _close_engine(engine)
            raise
        s = cls(store=st, tree=tree, engine=engine, owns_engine=owned, lock=lock, annotator=annotator, read_only=read_only)
        if warn:
            s.warnings.append(warn)
            warnings.warn(warn, ModelMismatchWarning, stacklevel=2)
        s._restore_position()
        return s

    def close(self) -> None:
        """Release the task lock (and the engine if the session loaded it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._lock_handle is not None:
            self._lock_handle.release()
            self._lock_handle = None
        if self._owns_engine:
            _close_engine(self.engine)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ position

    @property
    def task_id(self) -> str:
        return self.tree.id

    @property
    def end(self) -> str | None:
        """Id of the last node of the current path (None: nothing after the prompt)."""
        return self._end

    @property
    def cut(self) -> str | None:
        """The child of ``end`` that the last rollback cut away (the next steer's rejected side)."""
        return self._cut

    @property
    def generating(self) -> bool:
        return self._generating

    @property
    def path(self) -> list[Node]:
        return self.tree.path(self._end)

    @property
    def prompt_tokens(self) -> list[int]:
        return self.tree.prompt_tokens

    @property
    def response_tokens(self) -> list[int]:
        """Token ids of the current path after the prompt."""
        with self._mu:
            return self.tree.path_tokens(self._end)

    @property
    def context_tokens(self) -> list[int]:
        return self.prompt_tokens + self.response_tokens

    @property
    def response_text(self) -> str:
        """The detokenized response: concatenation of the pieces of ``tokens_view()``."""
        return "".join(n.text for n in self.path)

    def tokens_view(self) -> list[TokenInfo]:
        """One entry per response token of the current path (UTF-8-safe text pieces)."""
        with self._mu:
            out: list[TokenInfo] = []
            dec = TextDecoder()
            tb = self.engine.token_bytes
            i = 0
            for node in self.tree.path(self._end):
                for off, tok in enumerate(node.tokens):
                    out.append(
                        TokenInfo(
                            index=i,
                            node_id=node.id,
                            offset=off,
                            id=tok,
                            text=dec.feed(tb(tok)),
                            logprob=node.logprobs[off] if node.logprobs is not None else None,
                            top=[(int(t), float(lp)) for t, lp in node.top[off]] if node.top is not None else None,
                            author=node.author,
                            kind=node.kind,
                        )
                    )
                    i += 1
            return out

    def siblings(self, node_id: str | None = None) -> list[Node]:
        """The node (default: the current end, or the cut node after a rollback) and its
        siblings, in creation order: the alternatives the UI's [ and ] cycle through."""
        with self._mu:
            nid = node_id or self._cut or self._end
            if nid is None:
                return []
            return self.tree.children(self.tree.node(nid).parent)

    def switch_branch(self, node_id: str) -> None:
        """Move to another branch: the current path becomes the one through ``node_id`` down
        to its most recently created non-discarded leaf."""
        with self._mu:
            self._check_idle()
            self.tree.node(node_id)
            self._end = self._preferred_leaf(node_id)
            self._cut = None
            self._new_branch = False

    def goto(self, node_id: str | None) -> None:
        """Make ``node_id`` the end of the current path (None: back to the bare prompt)."""
        with self._mu:
            self._check_idle()
            if node_id is not None:
                self.tree.node(node_id)
            self._end = node_id
            self._cut = None
            self._new_branch = False

    # ------------------------------------------------------------------ generation

    def generate(self, max_tokens: int | None = None, stop: threading.Event | None = None) -> Iterator[Token]:
        """Let the model continue the current path; yields ``Token``s as they arrive.

        The tokens go to a model node: a new child of ``end``, or, when ``end`` is a model
        node that was paused or hit ``max_tokens`` and has nothing after it, that same node
        is extended (so pause/continue does not fragment the tree). After a rollback or
        ``resample()`` it is always a new node (a sibling of what was cut). When it stops,
        ``last_end`` and the node's ``end`` say why (eos | length | context | paused) and the
        tree is saved. Setting ``stop`` pauses it after the current token. A path that
        already ends with an EOS token yields nothing (``last_end == "eos"``)."""
        with self._mu:
            self._check_writable()
            self._check_idle()
        return self._run_generation(max_tokens, stop)

    def _run_generation(self, max_tokens: int | None, stop: threading.Event | None) -> Iterator[Token]:
        with self._mu:
            self._check_writable()
            self._check_idle()
            self._generating = True
        try:
            yield from self._generate(max_tokens, stop)
        finally:
            with self._mu:
                self._generating = False

    def _generate(self, max_tokens: int | None, stop: threading.Event | None) -> Iterator[Token]:
        with self._mu:
            context = self.context_tokens
            if len(context) > len(self.prompt_tokens) and context[-1] in self.engine.eos_ids:
                # the path already ended with EOS: nothing to continue (roll back first)
                self.last_end = "eos"
                return
            parent = self._end
            node = self.tree.node(parent) if parent is not None else None
            adapter = self.engine.adapter
            extend = (
                node is not None
                and node.is_model
                and node.end in ("paused", "length")
                and self._cut is None
                and not self._new_branch
                and not self.tree.children(node.id)
                and node.adapter == adapter
                and not self.tree.is_discarded(node.id)
            )
            n_model_children = sum(1 for c in self.tree.children(parent) if c.is_model)
            seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(31)
            rng = np.random.default_rng(
                [seed, zlib.crc32(np.asarray(context, dtype=np.int64).tobytes()), n_model_children]
            )
            dec = self._decoder_at(parent)
            gen = self.engine.generate(
                context, self.sampling, max_tokens=max_tokens, stop=stop, top_k=TOP_K, rng=rng
            )
            if extend:
                target = node
            else:
                target = None  # created lazily on the first token
            index = len(context) - len(self.prompt_tokens)
        step: Step
        last_save = time.monotonic()
        try:
            for step in gen:
                piece = dec.feed(self.engine.token_bytes(step.id))
                with self._mu:
                    if target is None:
                        target = self.tree.add(
                            Node(
                                id=self.tree.new_id(),
                                parent=parent,
                                author="model",
                                kind="generated",
                                tokens=[],
                                text="",
                                logprobs=[],
                                top=[],
                                end="paused",
                                adapter=dict(adapter) if adapter else None,
                            )
                        )
                        self._end = target.id
                        self._cut = None
                        self._new_branch = False
                        self._redo.clear()
                    elif target.id != self._end:
                        self._end = target.id
                    target.tokens.append(int(step.id))
                    target.text += piece
                    assert target.logprobs is not None and target.top is not None
                    target.logprobs.append(_r(step.logprob))
                    target.top.append([[int(t), _r(lp)] for t, lp in step.top])
                    target.end = "paused"
                    self.dirty = True
                    if time.monotonic() - last_save >= self.autosave_interval:
                        # a long generation is checkpointed, so a crash loses seconds, not minutes
                        last_save = time.monotonic()
                        try:
                            self._save_quietly_or_raise()
                        except SaveError:
                            pass  # still dirty; the save at the end reports it
                yield Token(int(step.id), piece, _r(step.logprob), [(t, _r(lp)) for t, lp in step.top], index)
                index += 1
        finally:
            end = gen.end or "paused"  # the consumer stopped iterating early: a pause
            with self._mu:
                self.last_end = end
                if target is not None:
                    target.end = end
                    self.tree.touch()
                    self.dirty = True
                    self._save_quietly_or_raise()

    def resample(self) -> None:
        """The next ``generate`` starts a new model branch at the current position (a sibling
        of what was cut, or a new child of ``end`` instead of extending it)."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            self._new_branch = True

    # ------------------------------------------------------------------ steering

    def rollback(self, n: int) -> None:
        """Keep the first ``n`` response tokens of the current path. A node that ``n`` falls
        inside is split (``tree.split``); what is cut stays in the tree as ``cut``, the
        rejected side of the next steer. Nothing is evaluated (the engine drops the cut part
        of its KV cache lazily, on the next evaluation). If ``n`` falls between the byte
        tokens of one character (an emoji split by a byte-level tokenizer), the rollback
        keeps only the tokens before that character, so no half character is left behind."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            if isinstance(n, bool) or not isinstance(n, int):
                raise SessionError(f"rollback takes a token count, got {n!r}")
            path = self.tree.path(self._end)
            total = sum(len(p.tokens) for p in path)
            if not 0 <= n <= total:
                raise SessionError(f"cannot roll back to {n} tokens: the response has {total}")
            if n == total:
                return
            tb = self.engine.token_bytes
            n = self._snap_to_character(path, n)
            start = 0
            dec = TextDecoder()
            prev: str | None = None
            for node in path:
                ln = len(node.tokens)
                if start + ln <= n:
                    for t in node.tokens:
                        dec.feed(tb(t))
                    prev, start = node.id, start + ln
                    continue
                at = n - start
                if at == 0:
                    self._end, self._cut = prev, node.id
                else:
                    head = "".join(dec.feed(tb(t)) for t in node.tokens[:at])
                    tail = "".join(dec.feed(tb(t)) for t in node.tokens[at:])
                    tail_node = self.tree.split(node.id, at, head, tail)
                    self._end, self._cut = node.id, tail_node.id
                break
            self._new_branch = False
            self._redo.clear()
            self.dirty = True
            self._save_quietly_or_raise()

    def correct(self, text: str) -> Node:
        """Add the human's text at the current position (a ``correction`` replacing what the
        last rollback cut, or an ``append`` when nothing was cut).

        The text is tokenized on its own (no BOS, control-token text stays plain text) and
        those ids are appended to the path: the tree's ids are exactly what the engine then
        evaluates (``engine.score``), which gives each correction token's log-prob and top-k.
        A tokenizer might have merged the text differently with the preceding response; we
        keep the typed boundary, which is what the human meant and what training sees."""
        if not isinstance(text, str):
            raise SessionError(f"a correction must be text, got {type(text).__name__}")
        if not text.strip():
            raise SessionError("a correction cannot be empty or only whitespace")
        with self._mu:
            self._check_writable()
            self._check_idle()
            tokens = self.engine.tokenize(text, add_bos=False, special=False)
            if not tokens:
                raise SessionError(f"the correction {text!r} produced no tokens")
            return self._add_human(tokens, "correction")

    def pick(self, token_id: int) -> Node:
        """Choose the next token yourself (normally one of the top-k alternatives shown at
        the current end; any id of the vocabulary is accepted). A ``pick`` node that replaces
        what the last rollback cut, if anything."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
                raise SessionError(f"pick takes a token id, got {token_id!r}")
            if not 0 <= int(token_id) < self.engine.n_vocab:
                raise SessionError(f"token id {token_id} is not in the vocabulary (0..{self.engine.n_vocab - 1})")
            return self._add_human([int(token_id)], "pick")

    def _add_human(self, tokens: list[int], kind: str) -> Node:
        context = self.context_tokens
        if len(context) + len(tokens) > self.engine.n_ctx:
            raise SessionError(
                f"the response would be {len(context) + len(tokens)} tokens, over the context "
                f"window ({self.engine.n_ctx}); roll back first"
            )
        try:
            steps = self.engine.score(context, tokens, top_k=TOP_K)
        except EngineError as exc:
            raise SessionError(str(exc)) from None
        cut = self.tree.node(self._cut) if self._cut is not None else None
        replaces = cut.id if cut is not None and cut.is_model else None
        # Typing over your own earlier text supersedes it: the cut human branch is
        # discarded (kept in the file, never trained on); undo brings it back.
        supersedes = cut.id if cut is not None and cut.is_human and cut.id not in self.tree.discarded else None
        if replaces is None and kind == "correction":
            kind = "append"
        dec = self._decoder_at(self._end)
        text = "".join(dec.feed(self.engine.token_bytes(t)) for t in tokens)
        node = self.tree.add(
            Node(
                id=self.tree.new_id(),
                parent=self._end,
                author="human",
                kind=kind,
                tokens=list(tokens),
                text=text,
                logprobs=[_r(s.logprob) for s in steps],
                top=[[[int(t), _r(lp)] for t, lp in s.top] for s in steps],
                replaces=replaces,
                annotator=self.annotator,
                extra={"supersedes": supersedes} if supersedes else {},
            )
        )
        if supersedes:
            self.tree.discarded.append(supersedes)
        self._end, self._cut = node.id, None
        self._new_branch = False
        self._redo.clear()
        self.dirty = True
        self._save_quietly_or_raise()
        return node

    def accept(self) -> None:
        """Mark the current path as good as a whole (its end goes to ``accepted``)."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            if self._end is None:
                raise SessionError("nothing to accept: the response is empty")
            if self._end not in self.tree.accepted:
                self.tree.accepted.append(self._end)
                self.tree.touch()
            self.dirty = True
            self._save_quietly_or_raise()

    def undo(self) -> Node | None:
        """Undo the most recent human node on the current path: it is added to ``discarded``
        (never deleted) and the position returns to the model branch it replaced (that
        branch's original end), or to its parent for an append/pick without ``replaces``.
        Returns the undone node, or None when there is nothing to undo."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            path = self.tree.path(self._end)
            gone = set(self.tree.discarded)
            human = next((n for n in reversed(path) if n.is_human and n.id not in gone), None)
            if human is None:
                return None
            before = self._end
            self.tree.discarded.append(human.id)
            self.tree.touch()
            superseded = human.extra.get("supersedes")
            if superseded in self.tree.discarded:  # bring back the text it had replaced
                self.tree.discarded.remove(superseded)
                self._end = self._original_end(superseded)
            elif human.replaces is not None:
                self._end = self._original_end(human.replaces)
            else:
                self._end = human.parent
            self._cut = None
            self._new_branch = False
            self._redo.append((human.id, before))
            self.dirty = True
            self._save_quietly_or_raise()
            return human

    def redo(self) -> Node | None:
        """Restore the last undone node (and the position it had). None if nothing to redo."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            if not self._redo:
                return None
            nid, pos = self._redo.pop()
            if nid in self.tree.discarded:
                self.tree.discarded.remove(nid)
            superseded = self.tree.node(nid).extra.get("supersedes")
            if superseded and superseded not in self.tree.discarded:
                self.tree.discarded.append(superseded)
            self.tree.touch()
            self._end = pos if (pos is None or pos in self.tree) else nid
            self._cut = None
            self._new_branch = False
            self.dirty = True
            self._save_quietly_or_raise()
            return self.tree.node(nid)

    # ------------------------------------------------------------------ saving

    def save(self) -> Path:
        """Write the tree atomically (with the current position). Raises ``SaveError`` on
        failure; the in-memory state is kept and ``dirty`` stays True."""
        with self._mu:
            self._check_writable()
            self.tree.extra[_POSITION_KEY] = {"end": self._end, "cut": self._cut}
            try:
                path = self.store.save(self.tree)
            except StoreError as exc:
                self.dirty = True
                raise SaveError(str(exc)) from exc
            self.dirty = False
            return path

    def _save_quietly_or_raise(self) -> None:
        if not self.read_only:
            self.save()

    # ------------------------------------------------------------------ helpers

    def _check_idle(self) -> None:
        if self._generating:
            raise SessionBusy("the model is generating; pause it first")

    def _check_writable(self) -> None:
        if self.read_only:
            raise SessionError(f"task {self.tree.id!r} is open read-only")
        if self._closed:
            raise SessionError("the session is closed")

    def _snap_to_character(self, path: list[Node], n: int) -> int:
        """The largest k <= n such that the first k response tokens end on a whole character."""
        dec = TextDecoder()
        tb = self.engine.token_bytes
        clean = 0
        i = 0
        for node in path:
            for t in node.tokens:
                if i >= n:
                    return clean
                dec.feed(tb(t))
                i += 1
                if not dec.pending():
                    clean = i
        return clean

    def _decoder_at(self, node_id: str | None) -> TextDecoder:
        """A text decoder that has seen every response token up to the end of ``node_id``."""
        dec = TextDecoder()
        tb = self.engine.token_bytes
        for t in self.tree.path_tokens(node_id):
            dec.feed(tb(t))
        return dec

    def _original_end(self, node_id: str) -> str:
        """Follow a node's split tails (``split_from``) to where the model originally stopped."""
        cur = node_id
        while True:
            nxt = next((c for c in self.tree.children(cur) if c.extra.get("split_from") == cur), None)
            if nxt is None:
                return cur
            cur = nxt.id

    def _preferred_leaf(self, node_id: str) -> str:
        """The most recently created non-discarded leaf below ``node_id`` (or itself)."""
        order = {n.id: i for i, n in enumerate(self.tree.nodes)}
        gone = set(self.tree.discarded)
        best, best_key = node_id, (self.tree.node(node_id).created_at, order[node_id])
        stack = [node_id]
        while stack:
            cur = stack.pop()
            kids = [c for c in self.tree.children(cur) if c.id not in gone]
            if not kids:
                key = (self.tree.node(cur).created_at, order[cur])
                if key > best_key or best == node_id:
                    best, best_key = cur, key
            stack.extend(k.id for k in kids)
        return best

    def _restore_position(self) -> None:
        """Where ``open`` continues: the saved position if valid, else the most recently
        created non-discarded leaf that is not a branch a human replaced."""
        saved = self.tree.extra.get(_POSITION_KEY)
        if isinstance(saved, dict):
            end, cut = saved.get("end"), saved.get("cut")
            if (end is None or end in self.tree) and (cut is None or (cut in self.tree and self.tree.node(cut).parent == end)):
                self._end, self._cut = end, cut
                return
        gone = set(self.tree.discarded)
        replaced = {n.replaces for n in self.tree.nodes if n.replaces and not self.tree.is_discarded(n.id)}
        best: str | None = None
        best_key: tuple[str, int] | None = None
        for i, n in enumerate(self.tree.nodes):
            if self.tree.children(n.id):
                continue
            ids = {p.id for p in self.tree.path(n.id)}
            if ids & gone or ids & replaced:
                continue
            key = (n.created_at, i)
            if best_key is None or key > best_key:
                best, best_key = n.id, key
        self._end, self._cut = best, None


def _r(logprob: float) -> float:
    """Log-probs are stored to 1e-6 (float32 logits carry no more; files stay compact)."""
    return round(float(logprob), 6)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise SessionError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SessionError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise SessionError(f"messages[{i}].role is {m['role']!r}; expected system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_model(tree: SteerTree, engine: Engine, path: Path) -> str | None:
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


def _close_engine(engine: Any) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pragma: no cover - best effort at shutdown
            pass


# re-exported for callers that catch errors from Session without importing the store/tree
SessionErrors = (SessionError, StoreError, TreeError, EngineError)
