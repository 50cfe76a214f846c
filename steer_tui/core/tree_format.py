"""The steer-tree file format, version 1 (see docs/format.md): its names and every
invariant a loader must check. :func:`check_tree` validates a tree's JSON object and raises
:class:`TreeError` naming the file, the node and the rule that was broken; ``SteerTree``
(tree.py) builds the model from a checked object.
"""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["AUTHORS", "ENDS", "FORMAT", "KINDS", "NODE_KEYS", "TREE_KEYS", "VERSION", "TreeError", "check_tree"]

FORMAT = "steer-tree"
VERSION = 1

AUTHORS = ("model", "human")
KINDS = {"model": ("generated",), "human": ("correction", "pick", "append")}
ENDS = ("eos", "length", "context", "paused", "cut")

#: The keys of a node object and of the top-level object that the format defines; any other
#: key is kept as it is (``extra``).
NODE_KEYS = (
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
TREE_KEYS = (
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


class TreeError(ValueError):
    """A steer tree breaks a rule of the format. ``str()`` names file, node and rule."""

    def __init__(self, message: str, *, file: str = "<memory>", node: str | None = None, rule: str = "") -> None:
        self.file = file
        self.node = node
        self.rule = rule
        self.message = message
        where = f"{file}: node {node!r}" if node is not None else file
        super().__init__(f"{where}: {rule + ': ' if rule else ''}{message}")


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


def check_tree(data: Any, source: str) -> None:
    """Check every invariant of the format on a tree's JSON object; raise TreeError naming
    ``source``, the node and the rule broken. A dict that passes can be built as is."""
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

    seen: dict[str, dict[str, Any]] = {}  # node id -> its raw object, in file order
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
        seen[nid] = raw

    for nid, raw in seen.items():
        parent = raw.get("parent")
        if parent is not None and parent not in seen:
            raise fail(f"parent {parent!r} does not exist", "parent exists", nid)
    _check_acyclic(seen, fail)
    for nid, raw in seen.items():
        replaces = raw.get("replaces") if raw["author"] == "human" else None
        if replaces is not None:
            rep = seen.get(replaces)
            if rep is None:
                raise fail(f"replaces {replaces!r}, which does not exist", "replaces names a model sibling", nid)
            if rep["author"] != "model":
                raise fail(f"replaces {replaces!r}, which is a human node", "replaces names a model sibling", nid)
            if rep.get("parent") != raw.get("parent"):
                raise fail(f"replaces {replaces!r}, which is not its sibling", "replaces names a model sibling", nid)

    for key in ("accepted", "discarded"):
        for ref in data.get(key, []):
            if not isinstance(ref, str) or ref not in seen:
                raise fail(f"{key} names {ref!r}, which is not a node", f"{key} ids exist")


def _check_acyclic(by_id: dict[str, dict[str, Any]], fail: Callable[..., TreeError]) -> None:
    state: dict[str, int] = {}  # 1 = on the current walk, 2 = known to reach a root
    for start in by_id:
        walk = []
        cur: str | None = start
        while cur is not None and state.get(cur) != 2:
            if state.get(cur) == 1:
                raise fail("the parent chain loops back to this node", "no cycles", cur)
            state[cur] = 1
            walk.append(cur)
            cur = by_id[cur].get("parent")
        for w in walk:
            state[w] = 2
