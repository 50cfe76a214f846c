"""Steer trees -> training examples, by token ids. No torch.

Everything the trainer needs is built here before any model exists:

* **SFT sequences** (``SFTSeq``): prompt + one root-to-leaf path per leaf of the live tree.
  ``weights[i]`` is the loss weight of predicting ``input_ids[i]`` (so ``weights[0] == 0``):
  0 on the prompt, 1 on human tokens, ``model_token_weight`` (default 0) on model tokens,
  ``accepted_weight`` on model tokens of accepted paths. A node shared by several paths
  carries its weight in the first path only (each token of a tree is trained once).
  ``labels`` is ``input_ids`` with :data:`IGNORE_INDEX` where the weight is 0.
  ``model_mask`` marks the model-written tokens (the reference-KL term acts on them).
  Paths through a rejected (replaced) model node are not SFT paths (that text was cut).
  No EOS is added unless the path ended with ``end == "eos"`` and the token is missing.
* **DPO pairs** (``Pair``): per steer, shared ``prefix`` (prompt + path to the human
  node's parent), ``chosen`` = the human tokens + ``chosen_continuation`` model tokens that
  follow on the chosen branch, ``rejected`` = the first K tokens of the replaced
  continuation, ``K = rejected_tokens`` or ``len(chosen)``. The replaced node is followed
  through later splits (``SteerTree.original_tokens``); when it is still shorter than K it
  is extended into its first live model child (and so on); if the branch ends first, the
  rejected side is left shorter. Pairs whose chosen equals the start of the rejected side
  carry no signal and are dropped. Tokens the two sides share at their start (a rewrite
  that retypes the sentence's first words) move into the prefix, so both spans start at
  the first divergent token: that is where the steer's contrast is, and what
  ``first_token_weight`` and reference-free losses must see (in the sigmoid DPO loss the
  shared tokens cancel exactly, with them or without).
* Discarded nodes and their subtrees are ignored.
* ``split_by_task`` splits tasks (never steers) into train / eval, seeded.

Tokenizer mismatch: when the training tokenizer's vocabulary is not the one the tree was
captured with (`train.retokenize.VocabCheck`), each segment's text is re-tokenized with
character offsets so every span (prompt / model / human) maps to an exact token range
(`train.retokenize.retokenize_segments`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from steer_tui.core.store import StoreError, load_tree, unique_task_id
from steer_tui.core.tree import Node, SteerTree, TreeError
from train.config import OBJECTIVES
from train.retokenize import VocabCheck, retokenize_segments

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(Exception):
    """No usable data; the message says where and why."""


# ----------------------------------------------------------------------------- options


@dataclass
class DataOptions:
    model_token_weight: float = 0.0
    accepted_weight: float = 0.5
    chosen_continuation: int = 0
    rejected_tokens: int | None = None  # None -> len(chosen)
    max_length: int | None = None  # drop sequences longer than this (tokens)

    def too_long(self, n_tokens: int) -> bool:
        """Whether a sequence of ``n_tokens`` exceeds ``max_length`` (and is dropped)."""
        return bool(self.max_length) and n_tokens > self.max_length


# ----------------------------------------------------------------------------- examples


@dataclass
class SFTSeq:
    input_ids: list[int]
    weights: list[float]
    model_mask: list[int]
    leaf: str

    @property
    def labels(self) -> list[int]:
        return [t if w > 0 else IGNORE_INDEX for t, w in zip(self.input_ids, self.weights)]


@dataclass
class Pair:
    """One steer. ``prefix + chosen`` and ``prefix + rejected`` are the two sequences."""

    steer: str
    kind: str
    prefix: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def chosen_ids(self) -> list[int]:
        return self.prefix + self.chosen

    @property
    def rejected_ids(self) -> list[int]:
        return self.prefix + self.rejected

    @property
    def chosen_span(self) -> tuple[int, int]:
        """Span of the chosen tokens on the prediction axis of ``chosen_ids``."""
        p = len(self.prefix) - 1
        return (p, p + len(self.chosen))

    @property
    def rejected_span(self) -> tuple[int, int]:
        p = len(self.prefix) - 1
        return (p, p + len(self.rejected))


@dataclass
class TaskExample:
    """All training material of one task (one tree): the dataset unit, so a batch keeps a
    task's shared prefixes together for tree packing."""

    task: str
    sft: list[SFTSeq] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    retokenized: bool = False
    group: str = ""  # the held-out split keys on this (the task id, shared by copies of one task)

    def __post_init__(self) -> None:
        self.group = self.group or self.task


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    trees: list[SteerTree]
    files: list[Path]
    errors: list[str]


def find_tree_files(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """``*.json`` files under each directory (recursively) or the files themselves."""
    files: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.json") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--data {str(s)!r} does not exist")
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def load_trees(sources: Sequence[str | os.PathLike[str]]) -> LoadReport:
    """Load and validate every tree; bad files are reported (logged + in ``errors``) and skipped.

    Raises DataError when no usable tree is left."""
    files = find_tree_files(sources)
    if not files:
        raise DataError(f"no *.json steer-tree files found in {', '.join(map(str, sources))}")
    trees, used, errors = [], [], []
    ids: dict[str, Path] = {}
    for f in files:
        try:
            tree = load_tree(f)
        except (TreeError, StoreError, OSError, ValueError) as exc:
            msg = str(exc) if str(f) in str(exc) else f"{f}: {exc}"
            errors.append(msg)
            log.warning("skipping %s", msg)
            continue
        if tree.id in ids:
            if f.read_bytes() == ids[tree.id].read_bytes():
                log.info("skipping %s: the same file as %s", f, ids[tree.id])
                continue
            # Two annotators' stores can hold one task id (a shared --tasks queue): keep both
            # trees under distinct ids; split_group keeps them on the same side of the split.
            new_id = unique_task_id(tree.id, ids)
            log.info("%s: task id %r also in %s; training on it as %r", f, tree.id, ids[tree.id], new_id)
            tree.extra.setdefault("split_group", tree.id)
            tree.id = new_id
        ids[tree.id] = f
        trees.append(tree)
        used.append(f)
    if not trees:
        raise DataError(
            f"no usable steer trees in {', '.join(map(str, sources))} ({len(errors)} bad file(s)):\n  "
            + "\n  ".join(errors[:10])
        )
    return LoadReport(trees, used, errors)


def split_by_task(items: Sequence[Any], eval_fraction: float, seed: int, key=lambda x: getattr(x, "group", "") or x.task) -> tuple[list, list]:
    """Split by task (stable under reordering: the order is a seeded hash of the task key).
    Items with the same key (copies of one task from two annotators) land on the same side.

    With ``eval_fraction > 0`` and at least two tasks, at least one task is held out and at
    least one is kept for training."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    groups: dict[str, list] = {}
    for x in items:
        groups.setdefault(str(key(x)), []).append(x)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_eval = int(round(eval_fraction * len(order)))
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = min(max(n_eval, 1), len(order) - 1)
    else:
        n_eval = 0
    return [x for k in order[n_eval:] for x in groups[k]], [x for k in order[:n_eval] for x in groups[k]]


# ----------------------------------------------------------------------------- tree walks


def live_children(tree: SteerTree, node_id: str | None) -> list[Node]:
    gone = set(tree.discarded)
    return [c for c in tree.children(node_id) if c.id not in gone]


def _rejected_ids(tree: SteerTree) -> set[str]:
    """Model nodes replaced by a live human sibling, plus the tails split from them."""
    out: set[str] = set()
    for n in tree.nodes:
        if n.is_steer and not tree.is_discarded(n.id):
            out.update(c.id for c in tree.split_chain(n.replaces))  # type: ignore[arg-type]
    return out


def sft_paths(tree: SteerTree) -> list[list[Node]]:
    """Root-to-leaf paths of the live tree that avoid rejected branches (DFS, creation order).

    An accepted leaf's path is kept even if it runs through a rejected node."""
    rejected = _rejected_ids(tree)
    accepted = set(tree.accepted)
    paths: list[list[Node]] = []

    def walk(node: Node, path: list[Node], through_rejected: bool) -> None:
        path = path + [node]
        through_rejected = through_rejected or node.id in rejected
        kids = live_children(tree, node.id)
        if not kids:
            if not through_rejected or node.id in accepted:
                paths.append(path)
            return
        for k in kids:
            walk(k, path, through_rejected)

    for root in live_children(tree, None):
        walk(root, [], False)
    return paths


def _accepted_path_nodes(tree: SteerTree) -> set[str]:
    out: set[str] = set()
    for leaf in tree.accepted:
        if leaf in tree and not tree.is_discarded(leaf):
            out.update(n.id for n in tree.path(leaf))
    return out


def _original_nodes(tree: SteerTree, node_id: str) -> list[Node]:
    """The replaced node and the tails later split from it (what the model first wrote)."""
    return tree.split_chain(node_id)


def _n_tokens(nodes: Sequence[Node]) -> int:
    return sum(len(n.tokens) for n in nodes)


def _extend_model(tree: SteerTree, start: Node, have: list[Node], n_tokens: int, count) -> list[Node]:
    """``have`` followed by the first live model child of ``start``, its first live model child
    and so on, while ``count(nodes)`` is below ``n_tokens``."""
    out = list(have)
    cur = start
    while count(out) < n_tokens:
        kids = [c for c in live_children(tree, cur.id) if c.is_model]
        if not kids:
            break
        cur = kids[0]
        out.append(cur)
    return out


# ----------------------------------------------------------------------------- building


def build_task(tree: SteerTree, opts: DataOptions, vocab: VocabCheck | None = None) -> TaskExample:
    """All SFT sequences and DPO pairs of one tree (see the module docstring)."""
    vocab = vocab or VocabCheck()
    retok = not vocab.same(tree)
    if retok:
        vocab.warn_once(tree)
    ex = TaskExample(tree.id, retokenized=retok, group=str(tree.extra.get("split_group") or tree.id))
    eos_ids = list((tree.model or {}).get("eos_ids") or [])
    if retok:
        eos = getattr(vocab.tokenizer, "eos_token_id", None)
        eos_ids = [eos] if eos is not None else []
    accepted_nodes = _accepted_path_nodes(tree)

    def seg_ids(prompt: bool, nodes: Sequence[Node]) -> tuple[list[int], list[list[int]]]:
        if not retok:
            return (tree.prompt_tokens if prompt else []), [list(n.tokens) for n in nodes]
        texts = ([tree.prompt.get("text", "")] if prompt else []) + [n.text for n in nodes]
        parts = retokenize_segments(vocab.tokenizer, texts)
        return (parts[0] if prompt else []), parts[1 if prompt else 0 :]

    # --- SFT
    done: set[str] = set()
    for path in sft_paths(tree):
        prompt_ids, parts = seg_ids(True, path)
        ids = list(prompt_ids)
        w = [0.0] * len(ids)
        mm = [0] * len(ids)
        for node, toks in zip(path, parts):
            first = node.id not in done
            done.add(node.id)
            if node.is_human:
                weight = 1.0
            else:
                weight = opts.model_token_weight
                if node.id in accepted_nodes:
                    weight = max(weight, opts.accepted_weight)
            ids += toks
            w += [weight if first else 0.0] * len(toks)
            mm += [1 if (node.is_model and first) else 0] * len(toks)
        leaf = path[-1]
        if leaf.is_model and leaf.end == "eos" and eos_ids and (not ids or ids[-1] not in eos_ids):
            ids.append(eos_ids[0])
            w.append(w[-1] if w else 0.0)
            mm.append(mm[-1] if mm else 0)
        if not ids:
            continue
        w[0] = 0.0  # the first token is never predicted
        mm[0] = 0
        if opts.too_long(len(ids)):
            log.warning("%s: path to %s has %d tokens > max_length %d; skipped", tree.id, leaf.id, len(ids), opts.max_length)
            continue
        if any(x > 0 for x in w) or any(mm):
            ex.sft.append(SFTSeq(ids, w, mm, leaf.id))

    # --- DPO pairs
    for st in tree.steers():
        h = st.node
        parent_path = tree.path(h.parent)
        n_cont = opts.chosen_continuation
        chosen_nodes = [h] + (_extend_model(tree, h, [], n_cont, _n_tokens) if n_cont > 0 else [])
        rej_nodes = _original_nodes(tree, st.replaced.id)
        if retok:
            prompt_ids, parts = seg_ids(True, parent_path)
            prefix = list(prompt_ids) + [t for p in parts for t in p]
            c_parts = retokenize_segments(vocab.tokenizer, [n.text for n in chosen_nodes])
        else:
            prefix = list(st.prefix)
            c_parts = [list(n.tokens) for n in chosen_nodes]
        chosen = list(c_parts[0]) + [t for p in c_parts[1:] for t in p][:n_cont]
        k = opts.rejected_tokens if opts.rejected_tokens is not None else len(chosen)
        if retok:
            count = lambda ns: sum(len(p) for p in retokenize_segments(vocab.tokenizer, [n.text for n in ns]))  # noqa: E731
            rej_nodes = _extend_model(tree, rej_nodes[-1], rej_nodes, k, count)
            r_parts = retokenize_segments(vocab.tokenizer, [n.text for n in rej_nodes])
        else:
            rej_nodes = _extend_model(tree, rej_nodes[-1], rej_nodes, k, _n_tokens)
            r_parts = [list(n.tokens) for n in rej_nodes]
        rejected = [t for p in r_parts for t in p][:k]
        if not chosen or not rejected or not prefix:
            continue
        m = min(len(chosen), len(rejected))
        if chosen[:m] == rejected[:m]:
            log.info("%s: steer %s: chosen equals the start of the rejected text; no DPO signal, skipped", tree.id, h.id)
            continue
        if opts.too_long(len(prefix) + max(len(chosen), len(rejected))):
            log.warning("%s: steer %s longer than max_length %d; skipped", tree.id, h.id, opts.max_length)
            continue
        lead = _common_lead(chosen, rejected)
        ex.pairs.append(Pair(h.id, h.kind, prefix + chosen[:lead], chosen[lead:], rejected[lead:]))
    return ex


def _common_lead(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Dataset:
    train: list[TaskExample]
    eval: list[TaskExample]
    errors: list[str]
    files: list[Path]

    def summary(self) -> dict[str, int]:
        def count(exs):
            return {
                "tasks": len(exs),
                "steers": sum(len(e.pairs) for e in exs),
                "sft_sequences": sum(len(e.sft) for e in exs),
                "human_tokens": sum(sum(1 for w in s.weights if w >= 1.0) for e in exs for s in e.sft),
            }

        tr, ev = count(self.train), count(self.eval)
        return {**{f"train_{k}": v for k, v in tr.items()}, **{f"eval_{k}": v for k, v in ev.items()},
                "bad_files": len(self.errors)}


def build_dataset(
    sources: Sequence[str | os.PathLike[str]] | None = None,
    *,
    trees: Sequence[SteerTree] | None = None,
    opts: DataOptions | None = None,
    vocab: VocabCheck | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    objective: str = "sft+dpo",
) -> Dataset:
    """Load trees (or take ``trees``), build every task's examples, split by task.

    Raises DataError when nothing usable is left for the objective."""
    opts = opts or DataOptions()
    errors: list[str] = []
    files: list[Path] = []
    if trees is None:
        if not sources:
            raise DataError("no --data given")
        rep = load_trees(sources)
        trees, errors, files = rep.trees, rep.errors, rep.files
    tasks = [build_task(t, opts, vocab) for t in trees]
    if objective not in OBJECTIVES:
        raise DataError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")

    def has_sft(t: TaskExample) -> bool:
        return any(any(w > 0 for w in s.weights) for s in t.sft)

    if objective == "dpo":
        usable = [t for t in tasks if t.pairs]
    elif objective == "sft":
        usable = [t for t in tasks if has_sft(t)]
    else:
        usable = [t for t in tasks if t.pairs or has_sft(t)]
    if not usable:
        what = "steers (human corrections that replace model text)" if objective == "dpo" else "human or accepted tokens"
        src = ", ".join(map(str, sources)) if sources else f"{len(trees)} tree(s)"
        hint = (" (only appends or accepted text? --objective sft or sft+dpo trains on those)"
                if objective == "dpo" else "")
        raise DataError(f"no {what} to train on in {src} ({len(trees)} usable tree(s)){hint}")
    train, ev = split_by_task(usable, eval_fraction, seed)
    return Dataset(train, ev, errors, files)


def tree_models(trees: Iterable[SteerTree]) -> list[dict]:
    return [dict(t.model or {}) for t in trees]

