"""`tune` under Accelerate's FSDP2 on CPU processes (gloo), for tests.

Accelerate only turns FSDP on for GPU-type backends; on CPU it silently falls back to DDP. This driver
builds the FSDP plugin from the shipped `recipes/accelerate/fsdp.yaml` (its `fsdp_config` section) and
switches the Accelerate state to FSDP after the gloo process group is up, so the recipes train with
real FSDP2 sharding (DTensor parameters, sharded optimizer state) on this machine.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu.py run finetune --config lora_ni ...
"""

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tune.engine  # noqa: E402


def fsdp_plugin_from_config(path: Path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = yaml.safe_load(path.read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"], state_dict_type=fsdp["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"])


def fsdp_accelerator(mixed_precision: str, num_threads: int | None = None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)  # sets up the gloo process group from torch.distributed.run's env
    assert accelerator.num_processes > 1, "run this under torch.distributed.run with --nproc_per_node >= 2"
    accelerator.state.fsdp_plugin = fsdp_plugin_from_config(REPO / "recipes" / "accelerate" / "fsdp.yaml")
    accelerator.state.distributed_type = DistributedType.FSDP
    if num_threads is not None:  # as tune.engine.make_accelerator
        tune.engine.apply_num_threads(num_threads, log=print if accelerator.is_main_process else None)
    return accelerator


if __name__ == "__main__":
    tune.engine.make_accelerator = fsdp_accelerator
    from tune.cli import main

    sys.exit(main(sys.argv[1:]))
