"""The steering screen: owns one headless ``Session`` and is a view over it.

Generation runs in a thread worker (``_stream``) that calls ``session.generate`` with a
``threading.Event`` for pause and posts batched ``Streamed`` messages (at most one every
50 ms), so keystrokes stay responsive however fast the model is. The screen mutates the
session only while no generation runs: a steering key pressed while streaming first pauses
(waits for the worker to stop), then acts.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from steer_tui.core.session import SaveError, TokenInfo
from steer_tui.core.text import TextDecoder
from steer_tui.core.text import pieces as text_pieces
from steer_tui.ui.keys import SESSION_KEYS, bindings
from steer_tui.ui.render import one_line
from steer_tui.ui.screens.alternatives import Alternative, AlternativesScreen
from steer_tui.ui.screens.stats import StatsScreen, count_steers
from steer_tui.ui.screens.tree import TreeScreen
from steer_tui.ui.widgets.status import CursorInfo, StatusBar
from steer_tui.ui.widgets.token_view import Piece, TokenView

# Coalesce streamed tokens: at most 20 screen updates a second. Smooth to read, and each
# frame costs the UI thread CPU that a small machine would rather give the model: on 2
# cores, app/Session.generate measured ~0.84 with 30 ms batches and ~0.9 with 50 ms.
BATCH_SECONDS = 0.05
STATUS_SECONDS = 0.5  # tokens/s and context in the status bar while streaming
GHOST_CHARS = 120  # rejected text shown (struck through) before a correction, at most
NEWLINE_MARK = "\u21b5"  # typed with ctrl+j in the correction editor, saved as "\n"
SAVE_RETRY_SECONDS = 5.0  # a failed save is tried again this long after, until it succeeds


@dataclass
class StreamedToken:
    text: str
    logprob: float | None


class CorrectionInput(Input):
    """The correction editor. enter submits, escape cancels, ctrl+j inserts a newline."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", show=True, id="correction.cancel"),
        Binding("ctrl+j", "newline", "Newline", show=True, key_display="^j", id="correction.newline"),
    ]

    class Cancelled(Message):
        pass

    def action_cancel(self) -> None:
        self.post_message(self.Cancelled())

    def action_newline(self) -> None:
        self.insert_text_at_cursor(NEWLINE_MARK)


@dataclass
class PathView:
    """What the screen draws for the current path: the pieces, and where each node starts
    (token index), so the token under the cursor maps back to its node in O(log n)."""

    pieces: list[Piece]
    starts: list[int]  # token index where each path node starts
    nodes: list[Any]  # the path nodes

    def locate(self, index: int) -> tuple[Any, int]:
        """(node, offset) of response token ``index``."""
        k = bisect_right(self.starts, index) - 1
        return self.nodes[k], index - self.starts[k]


def path_view(session: Any) -> PathView:
    """The current path as pieces, with the rejected text of each steer struck through
    just before the correction that replaced it. Decodes each token once (UTF-8 safe)."""
    tree = session.tree
    tb = session.engine.token_bytes
    dec = TextDecoder()
    out: list[Piece] = []
    starts: list[int] = []
    nodes = tree.path(session.end) if session.end is not None else []
    index = 0
    for node in nodes:
        starts.append(index)
        if node.replaces:
            # one line, cut short: enough to see what was replaced without pushing text away
            out.append(Piece(one_line(rejected_text(tree, node.replaces), GHOST_CHARS), "rejected"))
        author = "human" if node.is_human else "model"
        lps = node.logprobs
        for off, text in enumerate(text_pieces(tb, node.tokens, dec)):
            out.append(Piece(text, author, lps[off] if lps is not None else None))
        index += len(node.tokens)
    return PathView(out, starts, nodes)


def rejected_text(tree: Any, node_id: str) -> str:
    """The replaced node's text as the model wrote it (following later splits)."""
    text = tree.node(node_id).text
    cur = node_id
    while True:
        nxt = next((c for c in tree.children(cur) if c.extra.get("split_from") == cur), None)
        if nxt is None:
            return text
        text += nxt.text
        cur = nxt.id


class SessionScreen(Screen[None]):
    """One task: the token view, the correction editor, the cursor info and status bars."""

    BINDINGS = bindings(SESSION_KEYS)

    save_retry_seconds: float = SAVE_RETRY_SECONDS
    """Delay before a failed save is retried (one pending retry at a time)."""

    class Streamed(Message):
        """A batch of tokens from the generation worker."""

        def __init__(self, gen: int, tokens: list[StreamedToken]) -> None:
            super().__init__()
            self.gen = gen
            self.tokens = tokens

    class StreamEnded(Message):
        """The generation worker stopped: ``end`` is eos|length|context|paused, or error."""

        def __init__(self, gen: int, end: str | None, error: BaseException | None = None) -> None:
            super().__init__()
            self.gen = gen
            self.end = end
            self.error = error

    class Loaded(Message):
        def __init__(self, session: Any | None, error: BaseException | None) -> None:
            super().__init__()
            self.session = session
            self.error = error

    def __init__(self, loader: Callable[[], Any], *, task_label: str = "", autostart: bool = True) -> None:
        super().__init__()
        self._loader = loader
        self.session: Any | None = None
        self.task_label = task_label
        self.autostart = autostart
        self._stop = threading.Event()
        self._gen = 0
        self._worker: Worker | None = None
        self._stream_t0 = 0.0
        self._stream_n = 0
        self._status_t = 0.0
        self._edit_at: int | None = None
        self._save_failed = False
        self._retry_timer: Timer | None = None
        self._path: PathView | None = None
        self._steer_worker: Worker | None = None
        self.closed = False

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static("", id="prompt-line")
        yield TokenView(id="tokens")
        with Horizontal(id="correction-bar"):
            yield Static("", id="correction-label")
            yield CorrectionInput(placeholder="type the correction, enter submits, esc cancels", id="correction")
        yield CursorInfo(id="cursor-info")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def view(self) -> TokenView:
        return self.query_one(TokenView)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    def on_mount(self) -> None:
        self.view.prob_colors = getattr(self.app, "config", None) is not None and self.app.config.prob_colors
        self.status.state = "loading"
        self.status.task = self.task_label
        self.view.focus()
        self._load()

    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        try:
            session = self._loader()
        except Exception as exc:  # shown as a notification, the app stays usable
            self.post_message(self.Loaded(None, exc))
            return
        self.post_message(self.Loaded(session, None))

    def on_session_screen_loaded(self, event: Loaded) -> None:
        if event.error is not None:
            self.status.state = "error"
            self.query_one("#prompt-line", Static).update(Text(one_line(str(event.error)), style="bold red"))
            self.app.notify(str(event.error), title="Could not open the task", severity="error", timeout=10)
            return
        self.session = event.session
        if self.closed:  # the user left before it loaded
            self._close_session()
            return
        for warning in getattr(self.session, "warnings", []) or []:
            self.app.notify(str(warning), title="Model", severity="warning", timeout=10)
        self._refresh_all()
        engine = self.session.engine
        self._show_model()
        self.status.ctx_limit = int(getattr(engine, "n_ctx", 0) or 0)
        self.status.save_state = "read-only" if getattr(self.session, "read_only", False) else "saved"
        # a new task starts streaming at once; a reopened one waits where it stopped (it
        # was paused for a reason): space continues
        fresh = self.session.end is None and not self.session.tree.nodes
        if self.autostart and fresh and not getattr(self.session, "read_only", False):
            self.start_generation()
        else:
            self._set_paused_state()

    # ------------------------------------------------------------------ state helpers
    @property
    def streaming(self) -> bool:
        """The generation worker is running."""
        return self._worker is not None and self._worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    @property
    def generating(self) -> bool:
        """The model is busy: streaming, or evaluating a steer (generation follows it)."""
        return self.streaming or self.steering

    def _last_end(self) -> str | None:
        """Why the current path's model output stopped (None: it can continue)."""
        s = self.session
        if s.cut is not None:
            return None
        end = s.end
        if end is None:
            return None
        node = s.tree.node(end)
        return node.end if node.is_model and node.end != "cut" else None

    def _current_node_id(self) -> str | None:
        return self.session.end

    def _refresh_all(self, cursor: int | None = None) -> None:
        s = self.session
        self._path = path_view(s)
        self.view.set_pieces(self._path.pieces, cursor=cursor)
        prompt = s.tree.prompt
        msgs = prompt.get("messages") or []
        text = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), None) or prompt.get("text", "")
        line = Text(no_wrap=True, overflow="ellipsis")
        title = s.tree.title or s.tree.id
        if not " ".join(text.split()).startswith(title.rstrip("…")):
            line.append(" " + one_line(title, 40) + " ", style="bold reverse")
            line.append(" ")
        line.append("› ", style="bold")
        line.append(one_line(text, 300))
        self.query_one("#prompt-line", Static).update(line)
        self._update_status()
        self._update_cursor_info()

    def _update_status(self) -> None:
        s = self.session
        if s is None:
            return
        st = self.status
        st.ctx_used = len(s.tree.prompt_tokens) + self.view.n_tokens
        st.steers = count_steers(s.tree)

    def _set_paused_state(self) -> None:
        end = self._last_end()
        self.status.state = {"eos": "ended (eos)", "length": "paused (max tokens)", "context": "context full"}.get(end or "", "paused")
        self.view.show_cursor = True
        self._update_cursor_info()

    def _update_cursor_info(self) -> None:
        info = self.query_one(CursorInfo)
        s = self.session
        if s is None:
            info.info = ""
            return
        view = self.view
        i = view.cursor
        t = Text()
        if self.streaming:
            t.append("streaming… space pauses", style="italic")
        elif self.steering:
            t.append("applying the steer…", style="italic")
        elif i >= view.n_tokens:
            t.append(f" end of response ({view.n_tokens} tokens)", style="bold")
            if self._last_end() == "eos":
                t.append("  the model ended here: enter/tab replace the end-of-turn token, r resamples, d accepts")
            else:
                t.append("  enter: append text  tab: choose the next token  space: continue")
        else:
            tok = self._token_info(i)
            t.append(f" #{i} ", style="bold")
            t.append("“")
            t.append(one_line(tok.text, 30), style="reverse")
            t.append("”")
            if tok.logprob is not None:
                p = math.exp(tok.logprob)
                t.append(f"  p={p:.1%}")
                rank = None
                if tok.top:
                    for r, (tid, _lp) in enumerate(tok.top, start=1):
                        if int(tid) == tok.id:
                            rank = r
                            break
                    t.append(f"  rank {rank if rank is not None else '>' + str(len(tok.top))}")
            t.append(f"  {tok.author}/{tok.kind} {tok.node_id}", style="dim")
        info.info = t

    def _token_info(self, index: int) -> TokenInfo:
        """The response token ``index`` of the current path, from the tree (no copies)."""
        path = self._path
        if path is None or path.starts is None or self.view.n_tokens != self._path_tokens():
            self._path = path = path_view(self.session)
        node, off = path.locate(index)
        top = [(int(t), float(lp)) for t, lp in node.top[off]] if node.top is not None else None
        return TokenInfo(
            index=index,
            node_id=node.id,
            offset=off,
            id=node.tokens[off],
            text=self.view.token_text(index),
            logprob=node.logprobs[off] if node.logprobs is not None else None,
            top=top,
            author=node.author,
            kind=node.kind,
        )

    def _path_tokens(self) -> int:
        return sum(len(n.tokens) for n in self._path.nodes) if self._path else -1

    def _invalidate(self) -> None:
        self._path = None

    def on_token_view_cursor_moved(self, event: TokenView.CursorMoved) -> None:
        if not self.generating:
            self._update_cursor_info()

    # ------------------------------------------------------------------ saving
    def _save(self) -> bool:
        try:
            self.session.save()
        except Exception as exc:  # SaveError: the data stays in memory; retried
            self._save_failed = True
            self.status.save_state = f"save failed: {exc}"
            self.app.notify(f"{exc}\nYour work is kept in memory; saving is retried.", title="Save failed", severity="error", timeout=8)
            self._schedule_retry()
            return False
        self._save_failed = False
        self.status.save_state = "saved"
        return True

    def _schedule_retry(self) -> None:
        """Retry the save later; failures while a retry is pending share it (no pile-up)."""
        if self._retry_timer is None:
            self._retry_timer = self.set_timer(self.save_retry_seconds, self._retry_save)

    def _retry_save(self) -> None:
        self._retry_timer = None
        if not self._save_failed or self.session is None:
            return
        if self.generating:  # the stream saves when it stops; look again later
            self._schedule_retry()
            return
        if self._save():
            self.app.notify("Saved after retrying.", title="Saved")

    def _after_change(self, cursor: int | None = None) -> None:
        self._invalidate()
        self._save_if_dirty()
        self._refresh_all(cursor)

    def _save_if_dirty(self) -> None:
        """The session saves each mutation itself; write again only if that failed."""
        if getattr(self.session, "read_only", False):
            return
        if getattr(self.session, "dirty", True):
            self._save()
        else:  # everything is on disk (a later save by the session succeeded)
            self._save_failed = False
            self.status.save_state = "saved"

    # ------------------------------------------------------------------ generation
    def start_generation(self) -> None:
        if self.session is None or self.generating:
            return  # (a running steer starts generation itself when it is done)
        if getattr(self.session, "read_only", False):
            self.app.notify("This task is open read-only.", severity="warning")
            return
        self._gen += 1
        self._stop = threading.Event()
        self._stream_t0 = time.perf_counter()
        self._stream_n = 0
        self.view.show_cursor = False
        self.view.cursor = self.view.n_tokens
        self.status.state = "streaming"
        self._invalidate()
        self._update_cursor_info()
        self._worker = self._stream(self._gen, self._stop)

    @work(thread=True, exclusive=True, group="generate")
    def _stream(self, gen: int, stop: threading.Event) -> None:
        session = self.session
        batch: list[StreamedToken] = []
        last = time.perf_counter()
        post = self.post_message
        try:
            for tok in session.generate(stop=stop):
                batch.append(StreamedToken(tok.text, tok.logprob))
                now = time.perf_counter()
                if now - last >= BATCH_SECONDS:
                    post(self.Streamed(gen, batch))
                    batch = []
                    last = now
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None)))
        except Exception as exc:
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None), exc))

    def on_session_screen_streamed(self, event: Streamed) -> None:
        if event.gen != self._gen:
            return  # a batch from a stream that pause() already settled: the view has it
        view = self.view
        at_end = view.scroll_offset.y >= view.max_scroll_y - 1
        view.append([Piece(t.text, "model", t.logprob) for t in event.tokens])
        view.set_reactive(TokenView.cursor, view.n_tokens)
        if at_end:
            view.scroll_to_end()
        self._stream_n += len(event.tokens)
        now = time.perf_counter()
        if now - self._status_t >= STATUS_SECONDS:  # numbers nobody reads 30 times a second
            self._status_t = now
            self._update_stream_status(now)

    def _update_stream_status(self, now: float) -> None:
        dt = now - self._stream_t0
        if dt > 0:
            self.status.tokens_per_s = self._stream_n / dt
        self.status.ctx_used = len(self.session.tree.prompt_tokens) + self.view.n_tokens

    def on_session_screen_stream_ended(self, event: StreamEnded) -> None:
        if event.gen != self._gen:
            if event.error is not None:
                self._report_error(event.error, "Generation stopped")
            return
        self._worker = None
        self._update_stream_status(time.perf_counter())
        self._invalidate()
        if event.error is not None:
            self._report_error(event.error, "Generation stopped")
        # the session is the truth: redraw from it (also repairs anything a batch missed)
        self._refresh_all(self.view.n_tokens)
        if event.error is None:
            self._save_if_dirty()
        self._set_paused_state()
        end = self._last_end()
        if end == "context":
            self.app.notify("The context window is full: roll back, or accept the path.", title="Context full", severity="warning")

    def _mutate(self, fn: Callable[[], Any], title: str) -> tuple[bool, Any]:
        """Run a quick session mutation (the session saves it). A failed save keeps the
        change in memory: it is drawn, the save retried later. Other errors change nothing."""
        try:
            return True, fn()
        except Exception as exc:
            self._report_error(exc, title)
            if isinstance(exc, SaveError):
                self._invalidate()
                self._refresh_all(self.view.cursor)
                self._set_paused_state()
            return False, None

    def _report_error(self, exc: BaseException, title: str) -> None:
        if isinstance(exc, SaveError):
            self._save_failed = True
            self.status.save_state = f"save failed: {exc}"
            self._schedule_retry()
            self.app.notify(f"{exc}\nYour work is kept in memory; saving is retried.", title="Save failed", severity="error", timeout=8)
        else:
            self.app.notify(str(exc), title=title, severity="error", timeout=10)

    async def pause(self) -> None:
        """Stop streaming and wait until the worker has ended (the session is idle after)."""
        worker = self._worker
        if worker is None:
            return
        self._stop.set()
        try:
            await worker.wait()
        except Exception:
            pass
        # its last Streamed/StreamEnded messages may still be queued: settle now from the
        # session (the truth) and make those messages stale
        if self._worker is worker:
            self._worker = None
            self._gen += 1
            self._invalidate()
            self._refresh_all(self.view.n_tokens)
            self._set_paused_state()

    async def _idle(self) -> bool:
        """Pause if streaming; False if there is no session to act on."""
        if self.session is None:
            return False
        if self.streaming:
            await self.pause()
        if self.steering:
            return False  # a steer is being applied; generation resumes right after
        if self._edit_at is not None:
            return False
        return True

    # ------------------------------------------------------------------ steering (off the UI thread)
    class SteerDone(Message):
        """A steer (rollback + correct/pick/resample) finished in its worker."""

        def __init__(self, error: BaseException | None, title: str, at: int) -> None:
            super().__init__()
            self.error = error
            self.title = title
            self.at = at

    def _steer(self, fn: Callable[[], None], title: str, at: int) -> None:
        """Run a session mutation that evaluates tokens (a correction is scored by the
        engine) in a thread worker, then resume generation. The UI stays responsive."""
        self.status.state = "steering"
        self._steer_worker = self._steer_in_thread(fn, title, at)

    @work(thread=True, exclusive=True, group="steer")
    def _steer_in_thread(self, fn: Callable[[], None], title: str, at: int) -> None:
        try:
            fn()
        except Exception as exc:
            self.post_message(self.SteerDone(exc, title, at))
            return
        self.post_message(self.SteerDone(None, title, at))

    def on_session_screen_steer_done(self, event: SteerDone) -> None:
        self._steer_worker = None
        if self.session is None:
            return
        if event.error is not None:
            self._invalidate()
            self._refresh_all(event.at)
            self._report_error(event.error, event.title)
            if not isinstance(event.error, SaveError):
                self._save_if_dirty()  # a rollback before the error may have changed the tree
            self._set_paused_state()
            return
        self._after_change()
        if not self.closed:
            self.start_generation()

    @property
    def steering(self) -> bool:
        w = self._steer_worker
        return w is not None and w.state in (WorkerState.PENDING, WorkerState.RUNNING)

    # ------------------------------------------------------------------ actions
    async def action_toggle_pause(self) -> None:
        if self.session is None or self.steering:
            return
        if self.streaming:
            await self.pause()
            return
        if self._last_end() == "eos":
            self.app.notify("The model ended this response (eos). r resamples, enter corrects, d accepts.", title="Ended")
            return
        if self._last_end() == "context":
            self.app.notify("The context window is full.", severity="warning")
            return
        self.start_generation()

    async def action_correct(self, index: int | None = None) -> None:
        if not await self._idle():
            return
        if getattr(self.session, "read_only", False):
            self.app.notify("This task is open read-only.", severity="warning")
            return
        at = self._steer_point(self.view.cursor if index is None else index)
        self._edit_at = at
        self.view.set_pending(at, "")
        self.view.cursor = at
        bar = self.query_one("#correction-bar")
        bar.display = True
        label = "append" if at >= self.view.n_tokens else f"replace from #{at}"
        self.query_one("#correction-label", Static).update(Text(f" {label} › ", style="bold"))
        inp = self.query_one(CorrectionInput)
        inp.value = ""
        inp.focus()
        self.status.state = "editing"

    def _steer_point(self, at: int) -> int:
        """Where a steer at cursor ``at`` goes. After an EOS, "at the end" means instead of
        the EOS token: text after an end-of-turn token is never what a user wants to teach."""
        n = self.view.n_tokens
        if at >= n and n > 0 and self._last_end() == "eos":
            return n - 1
        return at

    async def on_token_view_correct_requested(self, event: TokenView.CorrectRequested) -> None:
        await self.action_correct(event.index)

    @on(Input.Changed, "#correction")
    def _correction_changed(self, event: Input.Changed) -> None:
        if self._edit_at is not None:
            self.view.set_pending(self._edit_at, event.value.replace(NEWLINE_MARK, "\n"))

    @on(CorrectionInput.Cancelled)
    def _correction_cancelled(self) -> None:
        self._close_editor()
        self._set_paused_state()

    def _close_editor(self) -> None:
        self._edit_at = None
        self.view.set_pending(None)
        self.query_one("#correction-bar").display = False
        self.view.focus()

    @on(Input.Submitted, "#correction")
    def _correction_submitted(self, event: Input.Submitted) -> None:
        at = self._edit_at
        text = event.value.replace(NEWLINE_MARK, "\n")
        if at is None:
            return
        if not text.strip():
            self.app.notify("A correction needs some text (escape cancels).", severity="warning")
            return
        s = self.session
        self._close_editor()
        cut = at < self.view.n_tokens

        def steer() -> None:
            if cut:
                s.rollback(at)
            s.correct(text)

        self._steer(steer, "Correction failed", at)

    async def action_alternatives(self) -> None:
        if not await self._idle():
            return
        s = self.session
        at = self._steer_point(self.view.cursor)
        k = getattr(getattr(self.app, "config", None), "top_k", 10)
        if at < self.view.n_tokens:
            info = self._token_info(at)
            top = info.top or []
            current = info.id
        else:
            ctx = list(s.tree.prompt_tokens) + list(s.response_tokens)
            try:
                top = s.engine.top(ctx, k)
            except Exception as exc:
                self._report_error(exc, "No alternatives")
                return
            current = None
        if not top:
            self.app.notify("No alternatives were recorded for this token.", severity="warning")
            return
        alts = [
            Alternative(int(tid), self._decode(int(tid)), float(lp), current=int(tid) == current)
            for tid, lp in list(top)[:k]
        ]
        where = f"at #{at}" if at < self.view.n_tokens else "after the end"
        title = f"Alternatives {where} — enter picks (a pick steer), esc cancels"
        self.app.push_screen(AlternativesScreen(alts, title), lambda choice: self._apply_pick(at, current, choice))

    def _apply_pick(self, at: int, current: int | None, choice: int | None) -> None:
        s = self.session
        if choice is None or s is None or self.generating:
            return
        if choice == current:
            self.app.notify("That is the token already there.")
            return
        cut = at < self.view.n_tokens

        def steer() -> None:
            if cut:
                s.rollback(at)
            s.pick(choice)

        self._steer(steer, "Pick failed", at)

    def _decode(self, token_id: int) -> str:
        engine = self.session.engine
        try:
            return engine.token_bytes(token_id).decode("utf-8", errors="replace")
        except Exception:
            return f"<{token_id}>"

    async def action_resample(self) -> None:
        if not await self._idle():
            return
        s = self.session
        at = self._steer_point(self.view.cursor)
        cut = at < self.view.n_tokens

        def steer() -> None:
            if cut:
                s.rollback(at)
            s.resample()

        self._steer(steer, "Resample failed", at)

    async def action_branch(self, step: int) -> None:
        if not await self._idle():
            return
        s = self.session
        n = self.view.n_tokens
        if n == 0:
            return
        node_id = self._token_info(min(self.view.cursor, n - 1)).node_id
        # the nearest branch point above the cursor: walk up until a node has siblings
        tree = s.tree
        for node in reversed(tree.path(node_id)):
            sibs = [c for c in tree.children(node.parent) if not tree.is_discarded(c.id)]
            if len(sibs) > 1:
                i = next(j for j, c in enumerate(sibs) if c.id == node.id)
                target = sibs[(i + step) % len(sibs)]
                break
        else:
            self.app.notify("No other branch above the cursor.")
            return
        try:
            s.switch_branch(target.id)
        except Exception as exc:
            self._report_error(exc, "Switch failed")
            return
        self._invalidate()
        self._save()
        n_before = len(tree.path_tokens(target.parent))
        self._refresh_all(n_before)
        self._set_paused_state()
        self.app.notify(f"branch {sibs.index(target) + 1}/{len(sibs)} at #{n_before}", timeout=2)

    async def action_undo(self) -> None:
        if not await self._idle():
            return
        ok, done = self._mutate(self.session.undo, "Undo")
        if not ok:
            return
        if done is None:
            self.app.notify("Nothing to undo.")
            return
        self._after_change()
        self._set_paused_state()

    async def action_redo(self) -> None:
        if not await self._idle():
            return
        ok, done = self._mutate(self.session.redo, "Redo")
        if not ok:
            return
        if done is None:
            self.app.notify("Nothing to redo.")
            return
        self._after_change()
        self._set_paused_state()

    async def action_accept(self) -> None:
        if not await self._idle():
            return
        ok, _ = self._mutate(self.session.accept, "Accept")
        if not ok:
            return
        self._after_change(self.view.cursor)
        self._set_paused_state()
        self.app.notify("Path marked done (accepted).", title="Accepted", timeout=3)

    def action_prob_colors(self) -> None:
        self.view.prob_colors = not self.view.prob_colors

    async def action_tree(self) -> None:
        if not await self._idle():
            return
        self.app.push_screen(TreeScreen(self.session.tree, self._current_node_id()), self._goto)

    async def action_stats(self) -> None:
        if not await self._idle():
            return
        self.app.push_screen(StatsScreen(self.session.tree), self._goto)

    def _goto(self, node_id: str | None) -> None:
        if not node_id or self.session is None or self.generating:
            return
        try:
            self.session.goto(node_id)
        except Exception as exc:
            self._report_error(exc, "Jump failed")
            return
        self._invalidate()
        self._save()
        tree = self.session.tree
        self._refresh_all(len(tree.path_tokens(tree.node(node_id).parent)))
        self._set_paused_state()

    async def action_save(self) -> None:
        if not await self._idle():
            return
        if self._save():
            self.app.notify("Saved.", timeout=2)

    async def action_toggle_adapter(self) -> None:
        """Switch the LoRA adapter on/off for the next continuation (compare base vs adapter
        at a branch point: roll back, toggle, resample)."""
        if not await self._idle():
            return
        engine = self.session.engine
        toggle = getattr(engine, "set_adapter_enabled", None)
        loaded = getattr(engine, "loaded_adapter", None)
        if toggle is None or not loaded:
            self.app.notify("No adapter loaded (start with --adapter LORA.gguf).", severity="warning")
            return
        enabled = not getattr(engine, "adapter_enabled", True)
        try:
            toggle(enabled)
        except Exception as exc:
            self._report_error(exc, "Adapter")
            return
        self.app.notify(f"Adapter {'on' if enabled else 'off'} for the next continuation.")
        self._show_model()

    def _show_model(self) -> None:
        engine = self.session.engine
        name = str(getattr(engine, "name", "model"))
        loaded = getattr(engine, "loaded_adapter", None) or getattr(engine, "adapter", None)
        if loaded:
            adapter = str(loaded.get("path", "adapter")).rsplit("/", 1)[-1]
            on = getattr(engine, "adapter_enabled", True)
            name += f" + {adapter}" if on else f" ({adapter} off)"
        self.status.model = name

    def action_task(self, step: int) -> None:
        self.app.call_later(self.app.action_switch_task, step)

    def action_tasks(self) -> None:
        self.app.call_later(self.app.action_open_tasks)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        """Stop generating, save, release the task lock."""
        self.closed = True
        worker = self._steer_worker
        if worker is not None:
            try:
                await worker.wait()
            except Exception:
                pass
        await self.pause()
        if self.session is not None:
            self._save_if_dirty()
            self._close_session()

    def _close_session(self) -> None:
        s, self.session = self.session, None
        if s is not None:
            try:
                s.close()
            except Exception:
                pass
