"""``?``: every binding with its current keys and its id (the id is what the keymap remaps)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from steer_tui.ui.keys import ALL_KEYS


def key_label(app, binding_id: str, default: str) -> str:
    keys = getattr(app, "keymap", {}).get(binding_id, default)
    out = []
    for k in keys.split(","):
        k = k.strip()
        out.append(app.get_key_display(Binding(k, "")) if k else k)
    return " / ".join(out)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", show=True)]

    def __init__(self, config_path: str | None = None) -> None:
        super().__init__()
        self.config_path = config_path

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(Text("Keys — remap them under [keymap] in " + (self.config_path or "the config file"), no_wrap=False), id="help-title")
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("Key", "Action", "Id")
        for k in ALL_KEYS:
            table.add_row(Text(key_label(self.app, k.id, k.keys), style="bold"), Text(k.description), Text(k.id, style="dim"))
        table.focus()
