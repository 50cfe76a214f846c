"""``python -m tests.train.fsdp_cpu ARGS``: ``steer-train ARGS`` with accelerate's FSDP allowed
on the CPU, for `accelerate launch --config_file configs/accelerate/fsdp*.yaml` in tests.

accelerate (1.16) turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for GPU-like
devices; on the CPU it stays ``MULTI_CPU`` (DDP on gloo), although torch's FSDP and FSDP2 run
there on gloo (FSDP2 only: torch 2.13's FSDP1 refuses to start without an accelerator
device, "FSDP needs a non-CPU accelerator device"). This lifts that one refusal: after ``AcceleratorState`` is set up, a
``MULTI_CPU`` state whose launcher asked for FSDP becomes ``FSDP`` with the plugin the launcher
configured. Everything else is the real path: the yaml, the launcher's environment, the
plugin, ``Accelerator.prepare`` wrapping the model, steer-train's code."""

from __future__ import annotations

import os
import sys


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # as accelerate does: a later AcceleratorState() copies PartialState's type back
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    from train.cli import main

    sys.exit(main(sys.argv[1:]))
