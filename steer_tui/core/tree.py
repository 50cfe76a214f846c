"""The steer tree: format ``steer-tree`` version 1 (see docs/format.md).

Pure data and pure Python: no engine, no I/O. Token ids are the truth; ``text`` is derived
by whoever created the node (the Session, from the engine's detokenizer).

Loading validates every invariant of the format and raises :class:`TreeError` naming the
file, the node and the rule that was broken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

FORMAT = "steer-tree"
VERSION = 1

AUTHORS = ("model", "human")
KINDS = {"model": ("generated",), "human": ("correction", "pick", "append")}
ENDS = ("eos", "length", "context", "paused", "cut")

_NODE_KEYS = (
    "id",
    "parent",
    "author",
    "kind",
    "tokens",
    "text",
    "logprobs",
    "top",
    "end",
    "replaces",
    "annotator",
    "adapter",
    "created_at",
)
_TREE_KEYS = (
    "format",
    "version",
    "id",
    "title",
    "created_at",
    "updated_at",
    "model",
    "prompt",
    "sampling",
    "nodes",
    "accepted",
    "discarded",
)


def utcnow() -> str:
    """Current UTC time as ISO 8601 with a ``Z`` suffix (second precision)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TreeError(ValueError):
    """A steer tree breaks a rule of the format. ``str()`` names file, node and rule."""

    def __init__(self, message: str, *, file: str = "<memory>", node: str | None = None, rule: str = "") -> None:
        self.file = file
        self.node = node
        self.rule = rule
        self.message = message
        where = f"{file}: node {node!r}" if node is not None else file
        super().__init__(f"{where}: {rule + ': ' if rule else ''}{message}")


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

    def depth_of(self, node_id: str | None) -> int:
        """Number of response tokens before ``node_id`` starts."""
        if node_id is None:
            return 0
        return sum(len(n.tokens) for n in self.path(self.node(node_id).parent))

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

    def original_tokens(self, node_id: str) -> list[int]:
        """Tokens of a node as the model first wrote them: later rollbacks split a node into
        a head and tail parts (``extra["split_from"]``); this follows that chain back together."""
        toks = list(self.node(node_id).tokens)
        cur = node_id
        while True:
            nxt = next((c for c in self._children.get(cur, ()) if c.extra.get("split_from") == cur), None)
            if nxt is None:
                return toks
            toks.extend(nxt.tokens)
            cur = nxt.id

    # -- mutation -------------------------------------------------------------------------
    def new_id(self) -> str:
        while f"n{self._next}" in self._by_id:
            self._next += 1
        nid = f"n{self._next}"
        self._next += 1
        return nid

    def touch(self) -> None:
        self.updated_at = utcnow()

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
        """Build and validate a tree; raises TreeError naming ``source``, node and rule."""
        return _parse_tree(data, source)

    def validate(self, source: str | None = None) -> None:
        """Re-check every invariant (e.g. before saving)."""
        _parse_tree(self.to_dict(), source or self.id)


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


# ---------------------------------------------------------------------------------------
# validation


def _id_number(node_id: str) -> int:
    if node_id.startswith("n") and node_id[1:].isdigit():
        return int(node_id[1:])
    return 0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and not (
        isinstance(x, float) and math.isnan(x)
    )


_INT_TYPES = frozenset({int})
_NUM_TYPES = frozenset({int, float})
_LIST_TYPE = frozenset({list})


def _numbers(xs: Any) -> bool:
    """A list of JSON numbers (no bools, no NaN)."""
    return isinstance(xs, list) and set(map(type, xs)) <= _NUM_TYPES and not any(map(math.isnan, xs))


def _parse_tree(data: Any, source: str) -> SteerTree:
    def fail(message: str, rule: str, node: str | None = None) -> TreeError:
        return TreeError(message, file=source, node=node, rule=rule)

    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}", "top level")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise fail(f"format is {fmt!r}, expected {FORMAT!r}", "format")
    version = data.get("version")
    if not _is_int(version):
        raise fail(f"version is {version!r}, expected an integer", "version")
    if version > VERSION:
        raise fail(
            f"version {version} is newer than this steer understands (max {VERSION}); upgrade steer",
            "version",
        )
    if version < 1:
        raise fail(f"version {version} is not a valid steer-tree version", "version")
    # version 1 is the only one so far; a future v2 loader migrates older dicts here.

    for key, typ in (("id", str), ("title", str), ("model", dict), ("prompt", dict), ("sampling", dict)):
        if not isinstance(data.get(key), typ):
            raise fail(f"field {key!r} must be a {typ.__name__}", "required field")
    for key in ("nodes", "accepted", "discarded"):
        if not isinstance(data.get(key, []), list):
            raise fail(f"field {key!r} must be a list", "required field")

    model = data["model"]
    n_vocab = model.get("n_vocab")
    if n_vocab is not None and (not _is_int(n_vocab) or n_vocab <= 0):
        raise fail(f"model.n_vocab is {n_vocab!r}, expected a positive integer", "model.n_vocab")

    # Checks run per element over tens of thousands of ids on a long task, so they use
    # C-level passes (map/min/max) and look for the offending element only on failure.
    def check_ids(ids: Any, where: str, node: str | None) -> list[int]:
        if not isinstance(ids, list) or not set(map(type, ids)) <= _INT_TYPES:
            raise fail(f"{where} must be a list of integer token ids", "token ids", node)
        if ids and (min(ids) < 0 or (n_vocab is not None and max(ids) >= n_vocab)):
            t = next(t for t in ids if t < 0 or (n_vocab is not None and t >= n_vocab))
            raise fail(f"{where} has token id {t} outside the vocabulary (n_vocab={n_vocab})", "token id < n_vocab", node)
        return ids

    adapter0 = model.get("adapter")
    if adapter0 is not None and not isinstance(adapter0, dict):
        raise fail(f"model.adapter is {adapter0!r}, expected an object or null", "model.adapter")
    prompt = data["prompt"]
    check_ids(prompt.get("tokens", []), "prompt.tokens", None)
    if not isinstance(prompt.get("text", ""), str):
        raise fail("prompt.text must be a string", "prompt.text")

    nodes: list[Node] = []
    seen: dict[str, Node] = {}
    raw_nodes = data.get("nodes", [])
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise fail(f"nodes[{i}] is not an object", "node object")
        nid = raw.get("id")
        if not isinstance(nid, str) or not nid:
            raise fail(f"nodes[{i}] has no string id", "node id")
        if nid in seen:
            raise fail("the id is used by more than one node", "unique ids", nid)
        author = raw.get("author")
        if author not in AUTHORS:
            raise fail(f"author is {author!r}, expected one of {AUTHORS}", "author", nid)
        kind = raw.get("kind")
        if kind not in KINDS[author]:
            raise fail(f"kind {kind!r} is not valid for a {author} node (expected {KINDS[author]})", "kind", nid)
        parent = raw.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise fail(f"parent must be a node id or null, got {parent!r}", "parent exists", nid)
        tokens = check_ids(raw.get("tokens"), "tokens", nid)
        text = raw.get("text", "")
        if not isinstance(text, str):
            raise fail("text must be a string", "text", nid)
        logprobs = raw.get("logprobs")
        if logprobs is not None:
            if not _numbers(logprobs):
                raise fail("logprobs must be a list of numbers", "logprobs", nid)
            if len(logprobs) != len(tokens):
                raise fail(
                    f"has {len(logprobs)} logprobs for {len(tokens)} tokens",
                    "len(logprobs) == len(tokens)",
                    nid,
                )
        top = raw.get("top")
        if top is not None:
            if not isinstance(top, list) or len(top) != len(tokens):
                raise fail("top must have one list of alternatives per token", "len(top) == len(tokens)", nid)
            if not set(map(type, top)) <= _LIST_TYPE:
                raise fail("top[i] must be a list of [id, logprob] pairs", "top", nid)
            pairs = [pair for step in top for pair in step]
            if pairs and (not set(map(type, pairs)) <= _LIST_TYPE or set(map(len, pairs)) != {2}
                          or not _numbers([p[1] for p in pairs])):
                bad = next((p for p in pairs if not (type(p) is list and len(p) == 2 and _is_num(p[1]))), pairs[0])
                raise fail(f"top entry {bad!r} is not [id, logprob]", "top", nid)
            check_ids([p[0] for p in pairs], "top", nid)
        end = raw.get("end")
        if author == "model" and end is not None and end not in ENDS:
            raise fail(f"end is {end!r}, expected one of {ENDS}", "end", nid)
        replaces = raw.get("replaces")
        if replaces is not None and not isinstance(replaces, str):
            raise fail("replaces must be a node id or null", "replaces names a model sibling", nid)
        if author == "model" and replaces is not None:
            raise fail("model nodes cannot replace anything", "replaces names a model sibling", nid)
        adapter = raw.get("adapter")
        if adapter is not None and not isinstance(adapter, dict):
            raise fail("adapter must be an object or null", "adapter", nid)
        annotator = raw.get("annotator")
        if annotator is not None and not isinstance(annotator, str):
            raise fail("annotator must be a string", "annotator", nid)
        created = raw.get("created_at", "")
        extra = {k: v for k, v in raw.items() if k not in _NODE_KEYS}
        node = Node(
            id=nid,
            parent=parent,
            author=author,
            kind=kind,
            tokens=list(tokens),
            text=text,
            logprobs=list(logprobs) if logprobs is not None else None,
            top=list(top) if top is not None else None,
            end=end if author == "model" else None,
            replaces=replaces if author == "human" else None,
            annotator=annotator,
            adapter=adapter,
            created_at=created if isinstance(created, str) else "",
            extra=extra,
        )
        seen[nid] = node
        nodes.append(node)

    for n in nodes:
        if n.parent is not None and n.parent not in seen:
            raise fail(f"parent {n.parent!r} does not exist", "parent exists", n.id)
    _check_acyclic(nodes, seen, fail)
    for n in nodes:
        if n.replaces is not None:
            rep = seen.get(n.replaces)
            if rep is None:
                raise fail(f"replaces {n.replaces!r}, which does not exist", "replaces names a model sibling", n.id)
            if rep.author != "model":
                raise fail(f"replaces {n.replaces!r}, which is a human node", "replaces names a model sibling", n.id)
            if rep.parent != n.parent:
                raise fail(f"replaces {n.replaces!r}, which is not its sibling", "replaces names a model sibling", n.id)

    for key in ("accepted", "discarded"):
        for ref in data.get(key, []):
            if not isinstance(ref, str) or ref not in seen:
                raise fail(f"{key} names {ref!r}, which is not a node", f"{key} ids exist")

    extra = {k: v for k, v in data.items() if k not in _TREE_KEYS}
    return SteerTree(
        id=data["id"],
        title=data["title"],
        created_at=str(data.get("created_at", "")),
        updated_at=str(data.get("updated_at", "")),
        model=dict(model),
        prompt=dict(prompt),
        sampling=dict(data["sampling"]),
        nodes=nodes,
        accepted=list(data.get("accepted", [])),
        discarded=list(data.get("discarded", [])),
        extra=extra,
    )


def _check_acyclic(nodes: Iterable[Node], by_id: dict[str, Node], fail) -> None:
    state: dict[str, int] = {}  # 1 = on the current walk, 2 = known to reach a root
    for start in nodes:
        walk = []
        cur: str | None = start.id
        while cur is not None and state.get(cur) != 2:
            if state.get(cur) == 1:
                raise fail("the parent chain loops back to this node", "no cycles", cur)
            state[cur] = 1
            walk.append(cur)
            cur = by_id[cur].parent
        for w in walk:
            state[w] = 2
