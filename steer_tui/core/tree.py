"""The steer tree model: nodes, paths, steers, splits, and the (de)serialisation of format
``steer-tree`` version 1 (see docs/format.md).

Pure data and pure Python: no engine, no I/O. Token ids are the truth; ``text`` is derived
by whoever created the node (the Session, from the engine's detokenizer). Loading checks
every invariant of the format first (``tree_format.check_tree``), which raises
:class:`TreeError` naming the file, the node and the rule that was broken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from steer_tui.core.tree_format import FORMAT, NODE_KEYS, TREE_KEYS, VERSION, TreeError, check_tree

__all__ = ["Node", "Steer", "SteerTree", "TreeError", "new_tree", "utcnow"]

def utcnow() -> str:
    """Current UTC time as ISO 8601 with a ``Z`` suffix (second precision)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Node:
    """One run of tokens written by the model or the human. See docs/format.md."""

    id: str
    parent: str | None
    author: str
    kind: str
    tokens: list[int]
    text: str
    logprobs: list[float] | None = None
    top: list[list[list[float]]] | None = None
    end: str | None = None
    replaces: str | None = None
    annotator: str | None = None
    adapter: dict[str, Any] | None = None
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_model(self) -> bool:
        return self.author == "model"

    @property
    def is_human(self) -> bool:
        return self.author == "human"

    @property
    def is_steer(self) -> bool:
        """A human node that replaced a model continuation: one training signal."""
        return self.author == "human" and self.replaces is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "parent": self.parent,
            "author": self.author,
            "kind": self.kind,
            "tokens": list(self.tokens),
            "text": self.text,
        }
        if self.logprobs is not None:
            d["logprobs"] = list(self.logprobs)
        if self.top is not None:
            d["top"] = [[[int(t), float(lp)] for t, lp in step] for step in self.top]
        if self.author == "model":
            d["end"] = self.end
        else:
            d["replaces"] = self.replaces
            if self.annotator is not None:
                d["annotator"] = self.annotator
        if self.adapter is not None:
            d["adapter"] = dict(self.adapter)
        d["created_at"] = self.created_at
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Node:
        """Build from a node object that ``check_tree`` accepted (unknown keys go to ``extra``)."""
        author = raw["author"]
        logprobs, top, created = raw.get("logprobs"), raw.get("top"), raw.get("created_at", "")
        return cls(
            id=raw["id"],
            parent=raw.get("parent"),
            author=author,
            kind=raw["kind"],
            tokens=list(raw["tokens"]),
            text=raw.get("text", ""),
            logprobs=list(logprobs) if logprobs is not None else None,
            top=list(top) if top is not None else None,
            end=raw.get("end") if author == "model" else None,
            replaces=raw.get("replaces") if author == "human" else None,
            annotator=raw.get("annotator"),
            adapter=raw.get("adapter"),
            created_at=created if isinstance(created, str) else "",
            extra={k: v for k, v in raw.items() if k not in NODE_KEYS},
        )


@dataclass
class Steer:
    """One steer: the human node, its shared prefix and both continuations (token ids).

    ``prefix`` is prompt tokens + response tokens up to ``node.parent``; ``rejected`` holds all
    tokens of the replaced node (callers truncate to K, or extend along its subtree).
    """

    node: Node
    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    replaced: Node


@dataclass
class SteerTree:
    """A task: prompt, provenance and the tree of model/human nodes."""

    id: str
    title: str
    created_at: str
    updated_at: str
    model: dict[str, Any]
    prompt: dict[str, Any]
    sampling: dict[str, Any]
    nodes: list[Node] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reindex()

    # -- indexes --------------------------------------------------------------------------
    def _reindex(self) -> None:
        self._by_id: dict[str, Node] = {}
        self._children: dict[str | None, list[Node]] = {}
        for n in self.nodes:
            self._by_id[n.id] = n
            self._children.setdefault(n.parent, []).append(n)
            if n.extra.get("split_from") not in (None, n.parent):
                # a split tail continues its parent; files written before split() kept this
                # up to date name an earlier head here, which would cut the tail chain
                n.extra["split_from"] = n.parent
        self._next = 1 + max((_id_number(i) for i in self._by_id), default=0)

    # -- queries --------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> list[int]:
        return list(self.prompt.get("tokens") or [])

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def node(self, node_id: str) -> Node:
        try:
            return self._by_id[node_id]
        except KeyError:
            raise TreeError(f"no node with id {node_id!r}", file=self.id, node=node_id, rule="unknown node") from None

    def children(self, node_id: str | None) -> list[Node]:
        """Children in creation order; ``None`` gives the roots."""
        return list(self._children.get(node_id, ()))

    def path(self, node_id: str | None) -> list[Node]:
        """Nodes from the root down to ``node_id`` (inclusive); ``[]`` for ``None``."""
        out: list[Node] = []
        cur = node_id
        while cur is not None:
            n = self.node(cur)
            out.append(n)
            cur = n.parent
        out.reverse()
        return out

    def path_tokens(self, node_id: str | None) -> list[int]:
        """Response tokens from the root through ``node_id`` (no prompt tokens)."""
        toks: list[int] = []
        for n in self.path(node_id):
            toks.extend(n.tokens)
        return toks

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if not self._children.get(n.id)]

    def is_discarded(self, node_id: str) -> bool:
        """True if the node or any of its ancestors was undone."""
        if not self.discarded:
            return False
        gone = set(self.discarded)
        return any(n.id in gone for n in self.path(node_id))

    def steers(self, include_discarded: bool = False) -> list[Steer]:
        """Every steer in file order. One depth-first walk keeps the running path tokens,
        so a task with hundreds of steers over a long response costs one pass plus one
        prefix copy per steer (not a walk up the tree per steer)."""
        if not any(n.is_steer for n in self.nodes):
            return []
        gone = set(self.discarded)
        prefix_of: dict[str, list[int]] = {}
        want = {n.parent for n in self.nodes if n.is_steer}
        running = list(self.prompt_tokens)
        base = len(running)
        # (node, entering?) pairs; a parent's tokens are on `running` while its subtree is walked
        stack: list[tuple[Node | None, int]] = [(c, 0) for c in reversed(self.children(None))]
        if None in want:
            prefix_of[""] = running[:]
        while stack:
            node, depth_len = stack.pop()
            assert node is not None
            del running[depth_len + base :]
            if not include_discarded and node.id in gone:
                continue
            running.extend(node.tokens)
            if node.id in want:
                prefix_of[node.id] = running[:]
            here = len(running) - base
            stack.extend((c, here) for c in reversed(self.children(node.id)))
        out = []
        for n in self.nodes:
            if not n.is_steer:
                continue
            key = n.parent if n.parent is not None else ""
            if key not in prefix_of or (not include_discarded and n.id in gone):
                continue  # under a discarded node
            replaced = self.node(n.replaces)  # type: ignore[arg-type]
            out.append(Steer(n, list(prefix_of[key]), list(n.tokens), self.original_tokens(replaced.id), replaced))
        return out

    def split_chain(self, node_id: str) -> list[Node]:
        """The node and the tails later rollbacks split from it (``extra["split_from"]``), in
        order: together they are the node as first written; the last one is where it ended."""
        chain = [self.node(node_id)]
        while True:
            cur = chain[-1].id
            nxt = next((c for c in self._children.get(cur, ()) if c.extra.get("split_from") == cur), None)
            if nxt is None:
                return chain
            chain.append(nxt)

    def original_tokens(self, node_id: str) -> list[int]:
        """Tokens of a node as the model first wrote them (its ``split_chain`` joined)."""
        return [t for n in self.split_chain(node_id) for t in n.tokens]

    def latest_leaf(self, node_id: str) -> str:
        """The most recently created non-discarded leaf below ``node_id`` (or itself)."""
        order = {n.id: i for i, n in enumerate(self.nodes)}
        gone = set(self.discarded)
        best, best_key = node_id, (self.node(node_id).created_at, order[node_id])
        stack = [node_id]
        while stack:
            cur = stack.pop()
            kids = [c for c in self.children(cur) if c.id not in gone]
            if not kids:
                key = (self.node(cur).created_at, order[cur])
                if key > best_key or best == node_id:
                    best, best_key = cur, key
            stack.extend(k.id for k in kids)
        return best

    def latest_live_leaf(self) -> str | None:
        """The most recently created leaf whose path has no discarded node and no branch a
        live human node replaced (None for a tree without nodes)."""
        gone = set(self.discarded)
        replaced = {n.replaces for n in self.nodes if n.replaces and not self.is_discarded(n.id)}
        best: str | None = None
        best_key: tuple[str, int] | None = None
        for i, n in enumerate(self.nodes):
            if self.children(n.id):
                continue
            ids = {p.id for p in self.path(n.id)}
            if ids & gone or ids & replaced:
                continue
            key = (n.created_at, i)
            if best_key is None or key > best_key:
                best, best_key = n.id, key
        return best

    # -- mutation -------------------------------------------------------------------------
    def new_id(self) -> str:
        while f"n{self._next}" in self._by_id:
            self._next += 1
        nid = f"n{self._next}"
        self._next += 1
        return nid

    def touch(self) -> None:
        self.updated_at = utcnow()

    def set_discarded(self, node_id: str, discarded: bool) -> None:
        """Add ``node_id`` to ``discarded`` (undone) or take it out again (redone)."""
        if discarded and node_id not in self.discarded:
            self.discarded.append(node_id)
        elif not discarded and node_id in self.discarded:
            self.discarded.remove(node_id)
        self.touch()

    def add(self, node: Node) -> Node:
        """Append a node (its parent must exist). Fills ``created_at`` if empty."""
        if node.id in self._by_id:
            raise TreeError("duplicate node id", file=self.id, node=node.id, rule="unique ids")
        if node.parent is not None and node.parent not in self._by_id:
            raise TreeError(f"parent {node.parent!r} does not exist", file=self.id, node=node.id, rule="parent exists")
        if node.replaces is not None:
            rep = self._by_id.get(node.replaces)
            if rep is None or rep.parent != node.parent or not rep.is_model:
                raise TreeError(
                    f"replaces {node.replaces!r}, which is not a model sibling",
                    file=self.id,
                    node=node.id,
                    rule="replaces names a model sibling",
                )
        if not node.created_at:
            node.created_at = utcnow()
        self.nodes.append(node)
        self._by_id[node.id] = node
        self._children.setdefault(node.parent, []).append(node)
        self.touch()
        return node

    def split(self, node_id: str, at: int, head_text: str, tail_text: str) -> Node:
        """Split ``node_id`` before token ``at`` (0 < at < len(tokens)).

        The node keeps ``tokens[:at]`` and its id (a model node gets ``end="cut"``); a new
        child holds ``tokens[at:]``, the old ``end`` and the old children. Human nodes that
        ``replaces`` this node keep pointing at the head, which is still their sibling. Returns
        the new tail node.
        """
        node = self.node(node_id)
        if not 0 < at < len(node.tokens):
            raise TreeError(
                f"cannot split at {at}: node has {len(node.tokens)} tokens",
                file=self.id,
                node=node_id,
                rule="split inside a node",
            )
        tail = Node(
            id=self.new_id(),
            parent=node.id,
            author=node.author,
            kind=node.kind if node.is_model else "append",
            tokens=node.tokens[at:],
            text=tail_text,
            logprobs=node.logprobs[at:] if node.logprobs is not None else None,
            top=node.top[at:] if node.top is not None else None,
            end=node.end,
            replaces=None,
            annotator=node.annotator,
            adapter=dict(node.adapter) if node.adapter else None,
            created_at=node.created_at,
            extra={"split_from": node.id},
        )
        node.tokens = node.tokens[:at]
        node.text = head_text
        if node.logprobs is not None:
            node.logprobs = node.logprobs[:at]
        if node.top is not None:
            node.top = node.top[:at]
        if node.is_model:
            node.end = "cut"
        old_children = self._children.pop(node.id, [])
        for c in old_children:
            c.parent = tail.id
            if "split_from" in c.extra:  # an earlier tail of this node now continues the new tail
                c.extra["split_from"] = tail.id
        self._children[tail.id] = old_children
        # the tail node goes right after the head so file order stays readable
        self.nodes.insert(self.nodes.index(node) + 1, tail)
        self._by_id[tail.id] = tail
        self._children[node.id] = [tail]
        # a human node that replaced one of the moved children stays valid: the pair moved
        # together. "accepted" means the whole path to the node's end, which is now the tail.
        self.accepted = [tail.id if a == node.id else a for a in self.accepted]
        self.touch()
        return tail

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "id": self.id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "model": self.model,
            "prompt": self.prompt,
            "sampling": self.sampling,
            "nodes": [n.to_dict() for n in self.nodes],
            "accepted": list(self.accepted),
            "discarded": list(self.discarded),
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> SteerTree:
        """Check and build a tree; raises TreeError naming ``source``, node and rule."""
        check_tree(data, source)
        return cls(
            id=data["id"],
            title=data["title"],
            created_at=str(data.get("created_at", "")),
            updated_at=str(data.get("updated_at", "")),
            model=dict(data["model"]),
            prompt=dict(data["prompt"]),
            sampling=dict(data["sampling"]),
            nodes=[Node.from_dict(raw) for raw in data.get("nodes", [])],
            accepted=list(data.get("accepted", [])),
            discarded=list(data.get("discarded", [])),
            extra={k: v for k, v in data.items() if k not in TREE_KEYS},
        )

    def validate(self, source: str | None = None) -> None:
        """Re-check every invariant (e.g. before saving)."""
        check_tree(self.to_dict(), source or self.id)


def new_tree(
    *,
    task_id: str,
    title: str,
    model: dict[str, Any],
    prompt: dict[str, Any],
    sampling: dict[str, Any],
) -> SteerTree:
    now = utcnow()
    return SteerTree(
        id=task_id,
        title=title,
        created_at=now,
        updated_at=now,
        model=dict(model),
        prompt=dict(prompt),
        sampling=dict(sampling),
    )


def _id_number(node_id: str) -> int:
    if node_id.startswith("n") and node_id[1:].isdigit():
        return int(node_id[1:])
    return 0
