"""``t``: the whole task as a tree: branch points, steers, rejected spans, accepted leaves.

Long tasks are deep (every steer is a branch point), so the tree is drawn as a *spine*: at
each branch point the child that continues the current path (or the newest one) follows at
the same level, and the other children hang below the branch point as sub-branches. Only
real alternatives indent. Choosing a node returns its id; the session jumps there.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from steer_tui.core.tree import Node, SteerTree
from steer_tui.ui.render import one_line, title_line
from steer_tui.core.stats import count_steers

KIND_MARK = {"generated": "·", "correction": "✎", "pick": "◆", "append": "+"}


def node_label(tree: SteerTree, node: Node, *, on_path: bool, accepted: set[str], discarded: bool) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    mark = KIND_MARK.get(node.kind, "?")
    style = ""
    if node.is_human:
        style = "bold green"
    if discarded:
        style = "dim strike"
    elif node.is_model and any(n.replaces == node.id for n in tree.children(node.parent) if n.is_human):
        style = "red"  # rejected by a steer
    t.append("● " if on_path else "  ", style="bold cyan")
    t.append(f"{mark} {node.id} ", style="bold " + style if style else "bold")
    t.append(f"[{len(node.tokens)}] ", style="dim")
    t.append(one_line(node.text, 60), style=style)
    if node.replaces:
        t.append(f"  (replaces {node.replaces})", style="dim")
    if node.end and node.end != "cut":
        t.append(f"  end:{node.end}", style="dim")
    if node.id in accepted:
        t.append("  ✓ done", style="bold green")
    return t


class TreeScreen(ModalScreen[str | None]):
    """Returns the id of the node to jump to, or None."""

    BINDINGS = [Binding("escape,t,q", "dismiss_none", "Close", show=True)]

    def __init__(self, tree: SteerTree, current: str | None) -> None:
        super().__init__()
        self.steer_tree = tree
        self.current = current

    def compose(self) -> ComposeResult:
        tr = self.steer_tree
        n_steers = count_steers(tr)
        with Vertical(id="tree-box"):
            yield Static(
                Text(
                    f"{title_line(tr.title)} — {len(tr.nodes)} nodes, {n_steers} steers, "
                    f"{len(tr.accepted)} accepted   (● current path ✎ correction ◆ pick + append; enter jumps)",
                    no_wrap=False,
                ),
                id="tree-title",
            )
            widget: Tree[str] = Tree(Text(title_line(tr.title) or tr.id), id="task-tree")
            widget.guide_depth = 2
            yield widget

    def on_mount(self) -> None:
        widget = self.query_one(Tree)
        tr = self.steer_tree
        on_path = {n.id for n in tr.path(self.current)} if self.current else set()
        accepted = set(tr.accepted)
        self._build(widget.root, None, on_path, accepted)
        widget.root.expand()
        widget.focus()
        target = self._tree_nodes.get(self.current or "")
        if target is not None:
            widget.move_cursor(target)
            self.call_after_refresh(widget.scroll_to_node, target, animate=False)

    def _build(self, root: TreeNode[str], parent_id: str | None, on_path: set[str], accepted: set[str]) -> None:
        tr = self.steer_tree
        self._tree_nodes: dict[str, TreeNode[str]] = {}
        discarded = set(tr.discarded)
        # (tree widget parent, first node id of a chain, inherited discarded flag)
        stack: list[tuple[TreeNode[str], str, bool]] = []
        roots = tr.children(parent_id)
        if roots:
            main = self._main_child(roots, on_path)
            for c in reversed([c for c in roots if c is not main]):
                stack.append((root, c.id, False))
            stack.append((root, main.id, False))
        while stack:
            holder, nid, gone = stack.pop()
            while True:
                node = tr.node(nid)
                gone_here = gone or nid in discarded
                kids = tr.children(nid)
                label = node_label(tr, node, on_path=nid in on_path, accepted=accepted, discarded=gone_here)
                main = self._main_child(kids, on_path) if kids else None
                others = [c for c in kids if c is not main]
                if others:
                    tnode = holder.add(label, data=nid, expand=any(c.id in on_path for c in others) or len(others) < 4)
                    for c in reversed(others):
                        stack.append((tnode, c.id, gone_here))
                else:
                    tnode = holder.add_leaf(label, data=nid)
                self._tree_nodes[nid] = tnode
                if main is None:
                    break
                nid, gone = main.id, gone_here

    @staticmethod
    def _main_child(kids: list[Node], on_path: set[str]) -> Node:
        for c in kids:
            if c.id in on_path:
                return c
        humans = [c for c in kids if c.is_human]
        return (humans or kids)[-1]

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        event.stop()
        if event.node.data:
            self.dismiss(event.node.data)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
