"""DeepSpeed's script entry points, for a script written against them: `add_config_arguments`
(--deepspeed, --deepspeed_config), `init_distributed`, and how initialize() finds its config
in `args` (DeepSpeed's initialize(args=..., config=..., config_params=...) rules).

    parser = zero_ext.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args()          # ... --deepspeed --deepspeed_config ds_config.json
    zero_ext.init_distributed()
    engine, optimizer, _, _ = zero_ext.initialize(args=args, model=model,
                                                  model_parameters=model.parameters())
"""

from __future__ import annotations

import argparse
import datetime
import os
import warnings

import torch.distributed as dist

from zero_ext import comm

__all__ = ["add_config_arguments", "check_launch", "config_from", "init_distributed"]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's arguments on `parser`: --deepspeed (a flag for the script's own use),
    --deepspeed_config (the JSON config initialize(args=...) reads), and their deprecated
    --deepscale / --deepscale_config spellings. Returns the parser."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations (zero_ext)")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (a flag for the script; zero_ext does not read it)")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed JSON configuration file")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated: --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated: --deepspeed_config")
    return parser


def config_from(args, config, config_params):
    """The config initialize() trains with, by DeepSpeed's rules: `config`, else
    `config_params` (its older name), else args.deepspeed_config (or the deprecated
    args.deepscale_config); exactly one source. Sets args.local_rank, where `args` has one, to
    this process's LOCAL_RANK, as DeepSpeed's engine does."""
    if config is not None and config_params is not None:
        raise ValueError("zero_ext.initialize: both config and config_params given; pass the "
                         "config once, as config=")
    config = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None)
    deprecated = getattr(args, "deepscale_config", None)
    if deprecated is not None:
        if from_args is not None:
            raise ValueError(
                f"zero_ext.initialize: args has both deepscale_config ({deprecated!r}) and "
                f"deepspeed_config ({from_args!r}); keep --deepspeed_config only")
        warnings.warn("zero_ext.initialize: --deepscale_config is deprecated; use "
                      "--deepspeed_config", DeprecationWarning, stacklevel=3)
        from_args = deprecated
    if from_args is not None and config is not None:
        raise ValueError(
            f"zero_ext.initialize: a config in args (deepspeed_config={from_args!r}) and one in "
            "the call; pass one of them (DeepSpeed refuses both as well)")
    config = config if config is not None else from_args
    if config is None:
        raise ValueError("zero_ext.initialize: no config: pass config= (a dict, a JSON path or "
                         "a ZeroConfig), or args parsed with --deepspeed_config FILE "
                         "(zero_ext.add_config_arguments(parser) adds it)")
    if args is not None and hasattr(args, "local_rank"):
        args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return config


def check_launch(dist_init_required: bool | None, mpu, mesh_param) -> None:
    """initialize()'s DeepSpeed launch arguments that zero_ext cannot honour, refused."""
    if mpu is not None or mesh_param is not None:
        raise ValueError("zero_ext.initialize: mpu / mesh_param describe model (tensor, "
                         "pipeline or sequence) parallelism, which zero_ext does not have: it "
                         "is data parallel over every rank; drop them")
    if dist_init_required is False and not dist.is_initialized():
        raise RuntimeError("zero_ext.initialize: dist_init_required=False, but no process group "
                           "is initialized; call zero_ext.init_distributed() (or "
                           "torch.distributed.init_process_group) first, or drop the argument")


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = 29500, verbose: bool = True,
                     timeout: datetime.timedelta = datetime.timedelta(minutes=30),
                     init_method: str | None = None, dist_init_required: bool | None = None,
                     config=None, rank: int = -1, world_size: int = -1) -> None:
    """DeepSpeed's deepspeed.init_distributed: joins the process group torchrun describes
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT; one rank without them), unless one exists. NCCL on
    GPUs, gloo on CPU, or `dist_backend`. auto_mpi_discovery, distributed_port, verbose and
    config change nothing here (torchrun's variables say where the group is); init_method,
    rank and world_size, which would place the process elsewhere, are refused."""
    if init_method is not None or rank != -1 or world_size != -1:
        raise ValueError(
            "zero_ext.init_distributed: init_method, rank and world_size are not supported; "
            "launch with torchrun, whose RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT place "
            "each process")
    if dist_init_required is False:
        return
    comm.init_distributed(backend=dist_backend, timeout_s=timeout.total_seconds())
