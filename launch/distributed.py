"""The launched world: ranks from the environment, the --nodes check, process-group set-up, and
SyncBatchNorm that also works on CPU.

Launchers tell each process its place through the environment: the DeepSpeed launcher sets
RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_SIZE/CROSS_SIZE, torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/
LOCAL_WORLD_SIZE/GROUP_WORLD_SIZE, OpenMPI sets OMPI_COMM_WORLD_*, SLURM sets SLURM_*.
Plain `python launch/train.py` has none of them and runs as a world of one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

HOSTFILE_HELP = (
    "To span N nodes, list them in a hostfile (one `HOST slots=GPUS` line per node, see "
    "launch/hostfile.example) and run `deepspeed --hostfile launch/hostfile launch/train.py "
    "--nodes N ...`; on SLURM use `sbatch --nodes N launch/slurm.sbatch` or `deepspeed "
    "--launcher slurm ...`; or start one launcher per node with `deepspeed --no_ssh "
    "--node_rank I --master_addr HOST0 ...` (see launch/README.md)."
)


class NodeCountError(RuntimeError):
    """The launched world does not span the number of nodes asked for."""


def _env_int(*names: str) -> int | None:
    for name in names:
        v = os.environ.get(name, "")
        if v.strip().isdigit():
            return int(v)
    return None


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    nodes: int
    launched: bool
    """True when a launcher set the environment (else a plain single process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """Read this process's place in the world from the launcher's environment variables."""
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
    if world is None:
        return WorldInfo(0, 0, 1, 1, 1, launched=False)
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID") or 0
    local_world = _env_int(
        "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"
    )
    nodes = _env_int("GROUP_WORLD_SIZE", "CROSS_SIZE")
    if nodes is None and local_world:
        nodes = max(1, world // local_world)
    if nodes is None:
        nodes = _env_int("SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    if local_world is None:
        local_world = max(1, world // nodes)
    return WorldInfo(rank, local_rank, world, local_world, nodes, launched=True)


def check_nodes(asked: int | None, info: WorldInfo) -> None:
    """Raise NodeCountError unless the world spans exactly `asked` nodes (None: no check)."""
    if asked is None or asked == info.nodes:
        return
    raise NodeCountError(
        f"--nodes {asked} was asked for, but the launched job spans {info.nodes} node(s) "
        f"(world size {info.world_size}, {info.local_world_size} process(es) per node). "
        + HOSTFILE_HELP
    )


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_accelerator() -> None:
    """Select DeepSpeed's CPU accelerator when there is no GPU (must precede `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = "127.0.0.1"
STORE_TIMEOUT = datetime.timedelta(minutes=30)
"""How long ranks wait for each other at start-up (torch's default for gloo)."""


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) resolves to a loopback address."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_interface() -> str | None:
    """The name of the interface that carries 127.0.0.1 ("lo" on Linux), if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
            return name
    return None


def single_machine(info: WorldInfo) -> bool:
    """True when every rank runs on this machine: one node and a loopback rendezvous address.

    Both are asked for: a rank on another machine could not reach a loopback address, and a
    host name that resolves to 127.0.1.1 on its own machine only (Debian's /etc/hosts) must not
    turn a multi-node run into a local one.
    """
    return info.nodes == 1 and is_loopback(os.environ.get("MASTER_ADDR", LOOPBACK))


def keep_collectives_on_loopback() -> None:
    """Make gloo and NCCL open their sockets on the loopback interface (unless the user chose)."""
    name = loopback_interface()
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


def loopback_store(info: WorldInfo, timeout: datetime.timedelta = STORE_TIMEOUT):
    """The rendezvous TCPStore of a one-machine world, listening on 127.0.0.1 only.

    torch's own store (init_method env://) listens on every interface whatever MASTER_ADDR says,
    and anyone who reaches it can read and set keys. Rank 0 binds the socket itself and hands
    it to the store.
    """
    port = int(os.environ["MASTER_PORT"])
    if not info.is_main:
        return torch.distributed.TCPStore(
            LOOPBACK, port, info.world_size, is_master=False, timeout=timeout
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
        sock.listen(max(128, info.world_size))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {LOOPBACK}:{port} (MASTER_PORT): {e}") from None
    return torch.distributed.TCPStore(
        LOOPBACK,
        port,
        info.world_size,
        is_master=True,
        timeout=timeout,
        master_listen_fd=sock.detach(),  # the store owns the socket from here on
    )


def init_process_group(info: WorldInfo, backend: str) -> None:
    """torch.distributed for this world; on one machine the store and the collectives stay on
    loopback. A launcher that runs its own store (torchrun's agent) keeps it."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if not single_machine(info) or agent_store:
        if single_machine(info):
            keep_collectives_on_loopback()
        torch.distributed.init_process_group(backend, timeout=STORE_TIMEOUT)
        return
    keep_collectives_on_loopback()
    store = loopback_store(info)
    torch.distributed.init_process_group(
        backend,
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=STORE_TIMEOUT,
    )


def init_distributed(info: WorldInfo, *, cpu_shm_comm: bool = False) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPUs) and hand it to DeepSpeed;
    idempotent.

    A process group made by someone else (e.g. Ray Train) is adopted as it is.
    """
    prepare_accelerator()
    import deepspeed

    if device_type() == "cpu" and not cpu_shm_comm:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use
        # (~2.5 min); gloo alone is correct and fast enough for CPU runs, so skip the build.
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    backend = "nccl" if device_type() == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if not info.launched:
            # A world of one: DeepSpeed still wants a process group.
            os.environ.update(
                {
                    "RANK": "0",
                    "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1",
                    "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": LOOPBACK,
                }
            )
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if device_type() == "cuda":
            torch.cuda.set_device(info.local_rank)
        # DeepSpeed's init would create the group through env://, whose store listens on
        # every interface: make it here and let DeepSpeed adopt it.
        init_process_group(info, backend)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)


# ---------------------------------------------------------------- SyncBatchNorm on CPU


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks (any backend, CPU too).

    torch.nn.SyncBatchNorm refuses CPU tensors. Here the per-channel sum, sum of squares and
    count go through the autograd-aware all-reduce, so gradients flow across ranks exactly as
    in synchronised BN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        dist = torch.distributed
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count = torch.full((1,), xf.numel() / c, dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        with warnings.catch_warnings():  # deprecated in favour of a non-autograd variant
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # (2C + 1,) summed over ranks, autograd-aware
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        inv = torch.rsqrt(var + self.eps)
        scale = inv if self.weight is None else inv * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """torch's SyncBatchNorm on GPUs, CPUSyncBatchNorm on CPU (BatchNorm2d layers only)."""
    if device != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            ref = module.weight if module.weight is not None else module.running_mean
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_object(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group or in a world of one."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
