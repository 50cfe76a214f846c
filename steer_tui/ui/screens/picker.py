"""Pick a saved task or type a new prompt (multi-line, optional system prompt)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, TextArea

from steer_tui.ui.render import one_line


@dataclass
class NewTask:
    prompt: str
    system: str | None = None


class PickerScreen(Screen["NewTask | str | None"]):
    """Dismisses with a ``NewTask``, a saved task id, or None (escape: back / quit)."""

    BINDINGS = [
        Binding("ctrl+s,f5", "start", "Start new task", show=True, id="picker.start"),
        Binding("escape", "back", "Back", show=True, id="picker.back"),
    ]

    def __init__(self, tasks: list, *, can_go_back: bool) -> None:
        super().__init__()
        self.tasks = tasks
        self.can_go_back = can_go_back

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label(Text("New task — prompt (multi-line; ctrl+s starts):", style="bold"))
            yield TextArea(id="new-prompt", soft_wrap=True, tab_behavior="focus")
            with Horizontal(id="system-row"):
                yield Input(placeholder="system prompt (optional)", id="new-system")
                yield Button("Start", id="start", variant="primary")
            yield Label(Text(f"Saved tasks ({len(self.tasks)}) — enter opens:", style="bold"))
            yield DataTable(id="task-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("updated", key="updated")
        table.add_column("steers", key="steers")
        table.add_column("title", key="title")
        for info in self.tasks:
            if getattr(info, "error", None):
                table.add_row(Text("broken", style="red"), Text("-"), Text(one_line(f"{info.id}: {info.error}", 70), style="red"), key=info.id)
            else:
                table.add_row(
                    Text((info.updated_at or "")[:16].replace("T", " ")),
                    Text(str(info.n_steers)),
                    Text(one_line(info.title or info.id, 70)),
                    key=info.id,
                )
        self.query_one("#new-prompt", TextArea).focus()

    def action_start(self) -> None:
        prompt = self.query_one("#new-prompt", TextArea).text
        if not prompt.strip():
            self.app.notify("Type a prompt first.", severity="warning")
            self.query_one("#new-prompt", TextArea).focus()
            return
        system = self.query_one("#new-system", Input).value
        self.dismiss(NewTask(prompt, system if system.strip() else None))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_start()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_start()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = event.row_key.value
        info = next((t for t in self.tasks if t.id == key), None)
        if info is not None and getattr(info, "error", None):
            self.app.notify(one_line(info.error, 300), title="This task file does not load", severity="error")
            return
        self.dismiss(key)

    def action_back(self) -> None:
        if self.can_go_back:
            self.dismiss(None)
        else:
            self.app.exit()
