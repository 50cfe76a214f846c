"""DDP on the CPU (gloo, 2 processes): reference log-probs computed once, split across ranks;
a rank whose batch is empty does not hang the others (under a collective timeout); a loss that
is NaN on one rank only stops every rank (none goes on to a backward the other never joins)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def _worker(rank: int, world: int, out_dir: str, what: str) -> None:
    import faulthandler
    import gc

    import torch.distributed as dist

    # a hang prints every thread's stack (in the test's captured stderr) and ends the rank
    faulthandler.dump_traceback_later(200, exit=True)
    # accelerate asks for MASTER_ADDR/PORT; the group is already up, so it never dials them
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="1")
    torch.set_num_threads(1)
    # rendezvous through a file in the test's tmp dir: no TCP port another process could take
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    # every DDP object lives in _run's frame and is freed before the group is destroyed: a
    # reducer freed after destroy_process_group hung the rank at exit (seen on 2 cores under
    # load, in the NaN case and in the empty-batch case, after the checks had passed)
    res = _run(rank, out_dir, what)
    gc.collect()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _run(rank: int, out_dir: str, what: str) -> dict:
    """One rank's part of the scenario ``what``: what it computed or raised."""
    from tests.train.tiny import synthetic_tree, tiny_llama
    from train.config import make_config
    from train.data import DataOptions, build_task
    from train.model_setup import build_peft_model
    from train.reference import ReferenceCache
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    cfg = make_config(data=["x"], out=out_dir, objective="sft+dpo", kl_mode="token", lora_r=4, lora_dropout=0.0,
                      progress=False)
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(6)]
    model = build_peft_model(tiny_llama(), cfg)
    res = {}
    if what == "reference":
        cache = ReferenceCache()
        cache.fill(model, tasks, cfg, True, True, shard=True)
        res = {"computed": cache.computed, "vals": {repr(k): v.tolist() for k, v in cache.logps.items()}}
    elif what == "nan":  # rank 1's LoRA weights become NaN after DDP's broadcast: its loss alone is NaN
        from train.trainer import NonFiniteLoss

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        trainer = SteerTrainer(model=ddp.module, args=training_arguments(cfg, Path(out_dir) / str(rank)),
                               train_dataset=TaskDataset(tasks), steer_config=cfg)
        trainer.prepare_reference(tasks)
        if rank == 1:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
        try:
            loss = trainer.compute_loss(ddp, {"tasks": tasks[rank * 2:rank * 2 + 2]})
            res = {"raised": None, "loss": float(loss)}
        except NonFiniteLoss as exc:
            res = {"raised": str(exc)}
    else:  # rank 1 gets no tasks at all
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        trainer = SteerTrainer(model=ddp.module, args=training_arguments(cfg, Path(out_dir) / str(rank)),
                               train_dataset=TaskDataset(tasks), steer_config=cfg)
        trainer.prepare_reference(tasks)
        mine = tasks[:2] if rank == 0 else []
        loss = trainer.compute_loss(ddp, {"tasks": mine})
        loss.backward()  # rank 0 waits here for rank 1's gradient all-reduce
        g = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
        res = {"loss": float(loss), "grad": g}
    return res


def _spawn(tmp_path, what):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(2, str(tmp_path), what), nprocs=2, join=False,
                             start_method="spawn")
    deadline = 240
    import time

    t0 = time.time()
    while not ctx.join(timeout=5):
        if time.time() - t0 > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what}: the ranks did not finish in {deadline}s (hang)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_reference_logprobs_computed_once_split_across_ranks(tmp_path):
    from tests.train.tiny import synthetic_tree, tiny_llama
    from train.config import make_config
    from train.data import DataOptions, build_task
    from train.model_setup import build_peft_model
    from train.reference import ReferenceCache

    r0, r1 = _spawn(tmp_path, "reference")
    assert r0["computed"] == r1["computed"] == 3  # 6 tasks, half each
    cfg = make_config(data=["x"], out=str(tmp_path), objective="sft+dpo", kl_mode="token", lora_r=4,
                      lora_dropout=0.0)
    one = ReferenceCache()
    one.fill(build_peft_model(tiny_llama(), cfg), [build_task(synthetic_tree(f"t{i}", i), DataOptions())
                                                   for i in range(6)], cfg, True, True, shard=True)
    assert one.computed == 6  # no process group: everything here
    for r in (r0, r1):  # every rank ends with the whole cache, the same numbers
        assert sorted(r["vals"]) == sorted(repr(k) for k in one.logps)
        # fp32 noise: the shards pack other tasks into a row than one process does
        diff = max(float((torch.tensor(r["vals"][repr(k)]) - v).abs().max()) if len(v) else 0.0 for k, v in one.logps.items())
        assert diff <= 1e-5


def test_a_rank_with_an_empty_batch_does_not_hang(tmp_path):
    r0, r1 = _spawn(tmp_path, "empty")
    assert r1["loss"] == 0.0
    assert r0["grad"] > 0 and r1["grad"] > 0  # DDP averaged rank 0's gradient into rank 1's
    assert r0["grad"] == pytest.approx(r1["grad"], rel=1e-6)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """The finite check all-reduces a "bad" flag: rank 0's own loss is finite, yet it must stop
    too, or it would wait forever in backward for a gradient rank 1 never sends."""
    r0, r1 = _spawn(tmp_path, "nan")
    assert r1["raised"] and "loss became nan" in r1["raised"], r1
    assert r0["raised"] and "stopping" in r0["raised"], r0  # rank 0 saw a finite loss, stopped anyway
