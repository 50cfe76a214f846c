"""FSDP2 on the CPU (gloo, 2 processes) and the shipped accelerate configs.

* every configs/accelerate/*.yaml goes through accelerate's own loader, launcher checks and
  plugin, so a misspelt key or value fails here;
* the reference passes under FSDP2 (`train.distributed.ShardedForward`): log-probs computed
  once, split across ranks, equal to one process's; a rank with an empty batch does not hang
  the other and adds nothing to the averaged gradient.

The whole ``steer-train`` run under ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
is in tests/train/test_ddp.py, next to the DDP run it is compared with."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp2", "zero2", "zero3"])
def test_shipped_accelerate_config_loads(name, monkeypatch):
    """The yaml through accelerate's config loader (a misspelt top-level key is a TypeError),
    its sections' keys through ``accelerate launch``'s own option names, and the environment
    the launcher would set through the plugin that reads it (a bad value raises there)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# "), f"{path.name}: no header comment saying when to use it"
    cfg = load_config_from_file(str(path))
    parser = launch_command_parser()
    options = {a.dest for a in parser._actions}
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp") else "fsdp_" + key) in options, f"{path.name}: fsdp_config.{key}"
    for key in cfg.deepspeed_config:
        assert key in options, f"{path.name}: deepspeed_config.{key}"
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "x.py"]))
    monkeypatch.chdir(CONFIGS.parents[1])  # the DeepSpeed json path is relative to the repo root
    if name.startswith("zero"):
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        plugin = DeepSpeedPlugin()
        assert cfg.distributed_type == DistributedType.DEEPSPEED
        assert plugin.zero_stage == int(name[-1])
        zero = json.loads(Path(defaults.deepspeed_config["deepspeed_config_file"]).read_text())["zero_optimization"]
        if name == "zero3":  # the LoRA is gathered to rank 0 at the end (Accelerator.get_state_dict)
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        return
    for k, v in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(k, v)
    if name == "ddp":
        assert cfg.distributed_type == DistributedType.MULTI_GPU
        return
    plugin = FullyShardedDataParallelPlugin()
    assert cfg.distributed_type == DistributedType.FSDP
    assert plugin.fsdp_version == (2 if name == "fsdp2" else 1)
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    if name == "fsdp":  # LoRA (trainable) and base (frozen) weights share a wrapped layer
        assert plugin.use_orig_params


# ------------------------------------------------------------------ FSDP2, in-process ranks


def _worker(rank: int, world: int, out_dir: str) -> None:
    import faulthandler
    import gc

    import torch.distributed as dist

    faulthandler.dump_traceback_later(200, exit=True)  # a hang prints the stacks and ends the rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = _run(rank, out_dir)  # every FSDP object lives and dies in _run's frame
    gc.collect()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _setup(out_dir: str):
    from tests.train.tiny import synthetic_tree, tiny_llama
    from train.config import make_config
    from train.data import DataOptions, build_task
    from train.model_setup import build_peft_model

    cfg = make_config(data=["x"], out=out_dir, objective="sft+dpo", kl_mode="full", lora_r=4, lora_dropout=0.0,
                      progress=False, token_budget=40)
    # 5 tasks of different sizes: the ranks' shards (3 and 2) need different numbers of forwards
    tasks = [build_task(synthetic_tree(f"t{i}", i, n_steers=1 + i % 3), DataOptions()) for i in range(5)]
    torch.manual_seed(0)
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():  # a LoRA that does something, so the adapter-off reference differs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return cfg, tasks, model


def _run(rank: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    from train.distributed import ShardedForward
    from train.reference import ReferenceCache
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    cfg, tasks, model = _setup(out_dir)
    for layer in model.base_model.model.model.layers:  # as accelerate's TRANSFORMER_BASED_WRAP does
        fully_shard(layer)
    fully_shard(model)
    fwd = ShardedForward(model, model, "cpu")
    cache = ReferenceCache()
    cache.fill(fwd, tasks, cfg, True, True, batch_size=1, shard=True)
    res = {"computed": cache.computed, "dummies_fill": fwd.dummies,
           "vals": {repr(k): v.tolist() for k, v in cache.logps.items()}}

    SteerTrainer.sharded = property(lambda self: True)  # what FSDP under accelerate reports
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, Path(out_dir) / str(rank)),
                           train_dataset=TaskDataset(tasks), steer_config=cfg, reference=cache)
    mine = tasks[:2] if rank == 0 else []  # rank 1 has nothing to learn from
    loss = trainer.compute_loss(model, {"tasks": mine})
    loss.backward()  # the reduce-scatter of the LoRA grads: rank 0 waits for rank 1 here
    grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
    res.update(loss=float(loss.detach()), grads=grads, dummies=trainer._sharded_fwd.dummies)
    return res


def test_fsdp2_reference_split_and_empty_batch_rank(tmp_path):
    import time

    import torch.multiprocessing as mp

    from train.reference import ReferenceCache
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    ctx = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    t0 = time.time()
    while not ctx.join(timeout=5):
        if time.time() - t0 > 240:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP2 ranks did not finish in 240 s (hang)")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    cfg, tasks, model = _setup(str(tmp_path))  # the same model and tasks, one process, unsharded
    one = ReferenceCache()
    one.fill(model, tasks, cfg, True, True, batch_size=1, shard=True)
    assert one.computed == 5 and (r0["computed"], r1["computed"]) == (3, 2)  # each log-prob once
    assert r1["dummies_fill"] > 0  # rank 1 had fewer forwards: it padded
    # the positions the cache computes (`Batch.logp_masks`): the unsharded run taps the output
    # layer and computes only those; the FSDP ranks run the plain path, which computes all
    from train.batching import Batch

    read = {}
    for t in tasks:
        b = Batch([t], use_sft=True, use_pairs=True)
        read.update((k, torch.tensor(f, dtype=torch.bool))
                    for k, f in zip(b.keys, b.logp_masks(sft=False, model_tokens=True)))
    assert sum(int(f.sum()) for f in read.values()) > 10
    for r in (r0, r1):
        assert sorted(r["vals"]) == sorted(repr(k) for k in one.logps)
        # the same fp32 computation on the same one-task rows: the weights come through an
        # all-gather that copies them bit for bit, so only a different kernel path could differ
        diff = max(float((torch.tensor(r["vals"][repr(k)])[read[k]] - v[read[k]]).abs().max())
                   if bool(read[k].any()) else 0.0 for k, v in one.logps.items())
        assert diff <= 1e-6

    # the empty rank padded rank 0's forwards and added nothing: the reduce-scattered gradient
    # is the mean over ranks, i.e. half of rank 0's batch alone
    assert r1["loss"] == 0.0 and r1["dummies"] > 0
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path / "one"),
                           train_dataset=TaskDataset(tasks), steer_config=cfg, reference=one)
    loss = trainer.compute_loss(model, {"tasks": tasks[:2]})
    loss.backward()
    assert r0["loss"] == pytest.approx(float(loss), rel=1e-5)
    want = {n: p.grad / 2 for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(r0["grads"]) == sorted(want) and r0["grads"] == r1["grads"]
    worst = max(float((torch.tensor(r0["grads"][n]) - g).abs().max() / g.abs().max().clamp_min(1e-12))
                for n, g in want.items())
    assert worst <= 1e-4


# ------------------------------------------------------------------ the end of a steer-train run


@pytest.mark.parametrize("ending", ["finished", "nan", "unexpected error"])
def test_steer_train_destroys_the_process_group_it_started(tmp_path, monkeypatch, ending):
    """The CLI destroys the process group its run started, whatever the ending, and only after
    the run's objects are freed (a DDP reducer freed after the group hung ranks at exit): on
    an unexpected error the traceback's frames are cleared so the trainer can go."""
    import gc
    import weakref

    import torch.distributed as dist

    import train.run
    from train import cli
    from train.config import make_config
    from train.trainer import NonFiniteLoss

    seen: dict = {}

    class Trainer:  # stands for the run's trainer and its DDP/FSDP objects
        pass

    def run_training(cfg, allow_model_mismatch=False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
        trainer = Trainer()
        seen["trainer"] = weakref.ref(trainer)
        if ending == "nan":
            raise NonFiniteLoss("loss became nan at step 2; stopping.")
        if ending == "unexpected error":
            raise RuntimeError("boom")
        return {}

    destroy = dist.destroy_process_group

    def recording_destroy(*a, **kw):
        gc.collect()
        seen["alive at destroy"] = seen["trainer"]() is not None
        return destroy(*a, **kw)

    monkeypatch.setattr(train.run, "run_training", run_training)
    monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
    monkeypatch.setattr(cli, "_print_summary", lambda cfg, m: None)
    cfg = make_config(data=["x"], out=str(tmp_path / "out"))
    assert not dist.is_initialized()
    if ending == "unexpected error":
        with pytest.raises(RuntimeError, match="boom"):
            cli._run(cfg)
    else:
        assert cli._run(cfg) == (0 if ending == "finished" else 3)
    assert not dist.is_initialized()
    assert seen["alive at destroy"] is False


def test_padding_forward_with_grad_runs_through_the_adapter_even_inside_the_reference():
    """A rank inside a reference pass (adapter off) that pads another rank's forward with grad
    must still give its LoRA weights a gradient: FSDP reduce-scatters only the parameters that
    have one, and the other rank's real rows give them one. After it, the adapter is off again."""
    from tests.train.tiny import tiny_llama
    from train.config import make_config
    from train.distributed import ShardedForward
    from train.model_setup import build_peft_model
    from train.reference import reference_mode

    model = build_peft_model(tiny_llama(), make_config(data=["x"], out="o", lora_r=4, lora_dropout=0.0))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    fwd = ShardedForward(model, model, "cpu")
    ids = torch.tensor([[1, 2, 3]])
    base = model(input_ids=ids).logits  # lora_B = 0: the adapter adds nothing yet
    with torch.no_grad():
        for p in lora:
            p.add_(0.1)
    with torch.no_grad(), reference_mode(fwd):
        fwd._dummy(grad=True)
        assert torch.allclose(fwd(input_ids=ids).logits, base)  # still the base model here
    extra = fwd.pad()
    assert extra is not None and float(extra) == 0.0
    extra.backward()
    assert all(p.grad is not None for p in lora)  # zeros, but there: the reduce-scatter matches
    assert not torch.allclose(model(input_ids=ids).logits, base)  # the adapter is back on outside
