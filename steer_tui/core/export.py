"""Export steer trees as JSONL that ``datasets.load_dataset("json", …)`` and TRL load as is.

Formats (one JSON object per line; token ids ride alongside the text under ``*_token_ids``
names that TRL does not interpret):

- ``dpo``: ``prompt`` / ``chosen`` / ``rejected`` per steer (TRL's standard preference
  format). ``prompt`` is the prompt text plus the response up to the cut; ``rejected`` is
  the first K tokens of what the model had written there (K = chosen length by default).
- ``sft``: ``prompt`` / ``completion`` per root-to-leaf path that holds a human span or was
  accepted; ``completion_weights`` mark which completion tokens were human (1) or model (0).
- ``kto``: ``prompt`` / ``completion`` / ``label``: chosen (True) and rejected (False) per
  steer, plus accepted paths (True).
- ``trees``: the steer-tree files themselves, one per line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from steer_tui.core.store import StoreError, load_tree, unique_task_id
from steer_tui.core.tree import SteerTree, TreeError

FORMATS = ("dpo", "sft", "kto", "trees")
Detok = Callable[[list[int]], bytes]


@dataclass
class ExportReport:
    trees: int = 0
    rows: int = 0
    skipped: list[str] | None = None


def iter_trees(paths: Iterable[str | os.PathLike[str]], errors: list[str]) -> Iterator[SteerTree]:
    """Trees from files and directories (``*.json`` below a directory, recursively).
    Files that fail to load are reported into ``errors`` and skipped."""
    for base in paths:
        b = Path(base)
        files = sorted(b.rglob("*.json")) if b.is_dir() else [b]
        for f in files:
            try:
                yield load_tree(f)
            except (StoreError, TreeError) as exc:
                errors.append(str(exc))


def llama_detokenizer(model_path: str | os.PathLike[str]) -> Detok:
    """Detokenize with the model's own vocabulary (vocab-only load: no weights in memory)."""
    from steer_tui.core.llama_load import load_llama

    llm = load_llama(model_path, vocab_only=True, verbose=False)
    return lambda ids: llm.detokenize(list(ids), special=True) if ids else b""


def _tail_text(detok: Detok | None, prefix: list[int], cont: list[int], fallback: str) -> str:
    if detok is None:
        return fallback
    head = detok(prefix)
    return detok(prefix + cont)[len(head) :].decode("utf-8", errors="replace")


def _path_text(tree: SteerTree, node_id: str | None) -> str:
    return "".join(n.text for n in tree.path(node_id))


def dpo_rows(tree: SteerTree, detok: Detok | None, rejected_tokens: int | None = None) -> Iterator[dict[str, Any]]:
    prompt_text = tree.prompt.get("text", "")
    for s in tree.steers():
        k = rejected_tokens if rejected_tokens else len(s.chosen)
        rejected = s.rejected[:k]
        resp_prefix = s.prefix[len(tree.prompt_tokens) :]
        yield {
            "prompt": prompt_text + _path_text(tree, s.node.parent),
            "chosen": s.node.text,
            "rejected": _tail_text(detok, resp_prefix, rejected, s.replaced.text),
            "prompt_token_ids": s.prefix,
            "chosen_token_ids": s.chosen,
            "rejected_token_ids": rejected,
            "task_id": tree.id,
            "steer_id": s.node.id,
            "kind": s.node.kind,
            "annotator": s.node.annotator,
        }


def _training_paths(tree: SteerTree) -> Iterator[tuple[str, bool]]:
    """(end node id, accepted) for each root-to-leaf path, and each accepted path, that is
    not discarded, holds a human span or was accepted, and does not run through a branch a
    (live) human node replaced."""
    replaced = {n.replaces for n in tree.nodes if n.replaces and not tree.is_discarded(n.id)}
    accepted = set(tree.accepted)
    ends = [n.id for n in tree.leaves()]
    ends += [a for a in tree.accepted if a not in set(ends)]
    for end in ends:
        if tree.is_discarded(end):
            continue
        path = tree.path(end)
        if any(n.id in replaced for n in path):
            continue
        ok = end in accepted
        if ok or any(n.is_human for n in path):
            yield end, ok


def sft_rows(tree: SteerTree) -> Iterator[dict[str, Any]]:
    prompt_text = tree.prompt.get("text", "")
    for leaf_id, ok in _training_paths(tree):
        path = tree.path(leaf_id)
        ids: list[int] = []
        weights: list[int] = []
        for n in path:
            ids.extend(n.tokens)
            weights.extend([1 if n.is_human else 0] * len(n.tokens))
        yield {
            "prompt": prompt_text,
            "completion": "".join(n.text for n in path),
            "prompt_token_ids": tree.prompt_tokens,
            "completion_token_ids": ids,
            "completion_weights": weights,
            "accepted": ok,
            "task_id": tree.id,
            "leaf_id": leaf_id,
        }


def kto_rows(tree: SteerTree, detok: Detok | None, rejected_tokens: int | None = None) -> Iterator[dict[str, Any]]:
    for row in dpo_rows(tree, detok, rejected_tokens):
        common = {"prompt": row["prompt"], "prompt_token_ids": row["prompt_token_ids"], "task_id": tree.id, "steer_id": row["steer_id"]}
        yield {**common, "completion": row["chosen"], "completion_token_ids": row["chosen_token_ids"], "label": True}
        yield {**common, "completion": row["rejected"], "completion_token_ids": row["rejected_token_ids"], "label": False}
    for row in sft_rows(tree):
        if row["accepted"]:
            yield {
                "prompt": row["prompt"],
                "prompt_token_ids": row["prompt_token_ids"],
                "completion": row["completion"],
                "completion_token_ids": row["completion_token_ids"],
                "label": True,
                "task_id": tree.id,
                "steer_id": None,
            }


def export(
    fmt: str,
    sources: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    detok: Detok | None = None,
    rejected_tokens: int | None = None,
) -> ExportReport:
    """Write ``fmt`` rows from all trees under ``sources`` to ``out`` (atomically)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    errors: list[str] = []
    report = ExportReport(skipped=errors)
    out_p = Path(out)
    tmp = out_p.with_name(f".{out_p.name}.tmp")
    try:
        _write_rows(fmt, sources, out_p, tmp, report, errors, detok, rejected_tokens)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StoreError(f"--out {out_p}: cannot write: {exc.strerror or exc}") from None
    return report


def _write_rows(fmt, sources, out_p: Path, tmp: Path, report: ExportReport, errors: list[str], detok, rejected_tokens) -> None:
    out_p.parent.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    with tmp.open("w", encoding="utf-8") as fh:
        for tree in iter_trees(sources, errors):
            report.trees += 1
            tree.id = unique_task_id(tree.id, taken)  # (task_id, steer_id) stays a unique key
            taken.add(tree.id)
            if fmt == "trees":
                rows: Iterable[dict[str, Any]] = [tree.to_dict()]
            elif fmt == "dpo":
                rows = dpo_rows(tree, detok, rejected_tokens)
            elif fmt == "sft":
                rows = sft_rows(tree)
            else:
                rows = kto_rows(tree, detok, rejected_tokens)
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                report.rows += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_p)

