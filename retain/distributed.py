"""Runs over several processes (``torchrun``): the ``Dist`` handle every shared piece talks to.

``torchrun --nproc_per_node=N -m retain run ...`` (or ``--nnodes``/``--rdzv-*`` over machines)
starts N copies of the same run; ``Dist.from_env`` reads the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group:
NCCL when the run's device is CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on the CPU. Without
those variables ``Dist()`` is one process and every helper below does nothing.

All ranks execute the same code on the same data (SPMD); the work is split in a few shared
places only, each gathering its results so that every rank holds the same values afterwards:

- ``FeatureCache.features``: the missing images are split across ranks, gathered in order
  (one backbone pass per image in total; rank 0 alone writes the disk cache);
- ``training.predict_batches``: the positions are split across ranks, the outputs gathered in
  order (features of a trained net, teacher logits, predictions at evaluation);
- ``training.fit`` / ``training.backward_share`` (also used by the methods' own loops): each
  rank computes the loss of its contiguous share of every global batch, weighted by its share
  of the batch, and the gradients are summed across ranks before the step (one step of N ranks
  x b equals one process with N·b); losses that couple a batch's samples gather the outputs
  (``shard="outputs"``) or compute the whole batch on every rank (``"replicate"``).

Decisions a rank could take differently (DEN expansion, APD consolidation, DyTox growth,
k-means, SupSup-GN task detection) are taken on rank 0 and broadcast; the runner checks after
every task that all ranks hold the same method state (``Dist.check_same``).

No ``inputs(pos)`` closure may itself call ``ctx.features`` or ``predict_batches`` (ranks call
their closures a different number of times in ``predict_batches``). Methods never call
torch.distributed, only ``ctx.dist``. Every registered method runs in several processes; a
method that cannot would be listed in ``REFUSED`` and refused with one line naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError, RetainError

# method -> why it cannot run in several processes (none at present; tests add an entry)
REFUSED: dict[str, str] = {}


def refusal(method: str) -> str | None:
    """One line saying why ``method`` cannot run in several processes (None: it can)."""
    why = REFUSED.get(method)
    if why is None:
        return None
    return (f"method {method} cannot run in several processes yet: it {why}; run it in one "
            "process (without torchrun), or pick another method")


def launched() -> bool:
    """True when this process was started by torchrun (or alike) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    """One process of ``world_size`` (rank 0 of 1 by default: every helper is a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo" or "nccl" once the process group is joined
    owns_group: bool = False  # this handle initialised the process group (and tears it down)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Dist:
        """The process group torchrun describes in the environment, joined (gloo on the CPU,
        NCCL for a CUDA ``device``); ``Dist()`` when not launched with several processes."""
        import torch.distributed as td

        if not launched():
            return cls()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not td.is_initialized()
        if owns:
            cuda = device is not None and device.type == "cuda"
            if cuda:
                torch.cuda.set_device(local)
            td.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                  rank=rank, world_size=world)
        return cls(rank, world, local, td.get_backend(), owns)

    def close(self) -> None:
        """Leave the process group if this handle joined it."""
        if self.owns_group:
            import torch.distributed as td

            td.destroy_process_group()
            self.owns_group = False

    # -- the device collectives run on ----------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        if self.backend == "nccl":
            return t.to(f"cuda:{self.local_rank}")
        return t.cpu()

    # -- collectives (no-ops in one process) -----------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place; returns ``t``."""
        if self.active:
            import torch.distributed as td

            buf = self._comm(t)
            td.all_reduce(buf)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s values of ``t`` on every rank, in place; returns ``t``."""
        if self.active:
            import torch.distributed as td

            buf = self._comm(t)
            td.broadcast(buf, src)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.active:
            return bool(flag)
        return bool(self.all_reduce_(torch.tensor([int(bool(flag))])).item())

    def sum(self, value: float) -> float:
        """The sum of ``value`` over ranks (float64)."""
        if not self.active:
            return value
        return float(self.all_reduce_(torch.tensor([value], dtype=torch.float64)).item())

    def gather_rows(self, t: torch.Tensor | None) -> torch.Tensor:
        """The rows of every rank's ``t`` (n_r, ...) concatenated in rank order, on every rank;
        a rank with nothing to give passes None (or zero rows). Returns ``torch.zeros(0)`` when
        no rank has rows."""
        if not self.active:
            return torch.zeros(0) if t is None else t
        import torch.distributed as td

        meta = None if t is None or not len(t) else (len(t), tuple(t.shape[1:]), t.dtype)
        metas = self.all_gather_object(meta)
        known = [m for m in metas if m is not None]
        if not known:
            return torch.zeros(0)
        _, trail, dtype = known[0]
        if any(m[1:] != (trail, dtype) for m in known):
            raise RuntimeError(f"ranks gather rows of different shapes or types: {metas}")
        most = max(m[0] for m in known)
        buf = torch.zeros(most, *trail, dtype=dtype)
        if meta is not None:
            buf[: len(t)] = t.detach().cpu()
        parts = [self._comm(torch.empty_like(buf)) for _ in range(self.world_size)]
        td.all_gather(parts, self._comm(buf))
        return torch.cat([p[: m[0]].cpu() for p, m in zip(parts, metas, strict=True)
                          if m is not None])

    # -- splitting work -------------------------------------------------------------------
    def shard(self, n: int, unit: int = 1) -> slice:
        """This rank's contiguous share of ``n`` items, in whole runs of ``unit`` (batches:
        each rank then computes exactly the batches one process would): rank r of W takes
        units [u·r/W, u·(r+1)/W) of the u = ceil(n / unit)."""
        units = -(-n // unit)
        lo, hi = units * self.rank // self.world_size, units * (self.rank + 1) // self.world_size
        return slice(min(lo * unit, n), min(hi * unit, n))

    def batch_share(self, x, y: torch.Tensor):
        """This rank's rows of a global batch (``x`` a tensor or nested tuples of tensors, one
        row per target of ``y``) and their share of the batch: the loss weight that makes the
        summed gradients those of the global batch's mean loss. Inputs that are not one row per
        sample (replay appends a memory batch), or a batch smaller than the number of ranks,
        are kept whole on every rank, at weight 1/W."""
        if not self.active:
            return x, y, 1.0
        if not _rows_match(x, len(y)) or len(y) < self.world_size:  # (no rank left empty)
            return x, y, 1.0 / self.world_size
        part = self.shard(len(y))
        return _take(x, part), y[part], (part.stop - part.start) / max(len(y), 1)

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` in rank order (as ``gather_rows``), differentiable: the
        gradient of the gathered rows flows back to this rank's own rows only. For a loss that
        every rank computes identically on the whole gathered batch (in-batch contrast, B x B
        similarities), summing the ranks' gradients then gives exactly one process's."""
        if not self.active:
            return t
        return _GatherRows.apply(t, self)

    def counted_once(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` unchanged, its gradient divided by the number of ranks: a term that every rank
        computes whole (a text tower, a weight penalty) then counts once when the ranks'
        gradients are summed."""
        return t if not self.active else _ScaledGradient.apply(t, 1.0 / self.world_size)

    def reduce_gradients(self, params) -> None:
        """Sum the gradients of ``params`` over ranks (one flat all-reduce). A parameter that no
        rank gave a gradient keeps none (so optimisers skip it as in one process)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        dev = torch.device(f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu")
        flat = torch.cat([torch.zeros(p.numel() + 1, device=dev) if p.grad is None else
                          torch.cat([p.grad.detach().float().to(dev).reshape(-1),
                                     torch.ones(1, device=dev)]) for p in params])
        self.all_reduce_(flat)
        at = 0
        for p in params:
            g, had = flat[at : at + p.numel()], flat[at + p.numel()]
            at += p.numel() + 1
            if had > 0:
                p.grad = g.view_as(p).to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad = None

    def same_state(self, model: torch.nn.Module, generator: torch.Generator | None = None
                   ) -> None:
        """After training: rank 0's floating buffers (e.g. BatchNorm running statistics, which
        each rank updates on its own share), ``generator`` and torch's global RNG on every rank,
        so that ranks cannot drift apart."""
        if not self.active:
            return
        for b in model.buffers():
            if b.is_floating_point():
                self.broadcast_(b.data)
        if generator is not None:
            generator.set_state(self.broadcast_(generator.get_state().clone()))
        torch.set_rng_state(self.broadcast_(torch.get_rng_state().clone()))

    def check_same(self, state: dict[str, torch.Tensor], what: str) -> None:
        """RuntimeError on every rank unless all ranks hold the same ``state`` (compared by a
        sha256 of its tensors): the guard that a method stayed identical across ranks."""
        if not self.active:
            return
        import hashlib

        h = hashlib.sha256()
        for k in sorted(state):
            t = state[k].detach().cpu().contiguous().reshape(-1)
            h.update(f"{k} {t.dtype} {tuple(state[k].shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digests = self.all_gather_object(h.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"the processes hold different states of {what} (this is a bug "
                               "in retain: please report it); run it in one process meanwhile")

    def check(self, error: RetainError | None) -> None:
        """Collective error check: every rank raises when any rank had ``error`` (a RetainError
        on the ranks that did not see it, naming the rank that did)."""
        if not self.active:
            if error is not None:
                raise error
            return
        seen = self.all_gather_object(None if error is None else str(error))
        if error is not None:
            raise error
        first = next(((r, m) for r, m in enumerate(seen) if m is not None), None)
        if first is not None:
            raise RetainError(f"rank {first[0]} stopped: {first[1]}")


class _GatherRows(torch.autograd.Function):
    """All ranks' rows forward; backward keeps the slice of the (identical) gradient that
    belongs to this rank's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dist: Dist) -> torch.Tensor:
        sizes = dist.all_gather_object(len(t))
        ctx.rows = slice(sum(sizes[: dist.rank]), sum(sizes[: dist.rank + 1]))
        return dist.gather_rows(t.detach()).to(t.device, t.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rows], None


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _rows_match(x, n: int) -> bool:
    if isinstance(x, tuple):
        return all(_rows_match(t, n) for t in x)
    return len(x) == n


def _take(x, part: slice):
    return tuple(_take(t, part) for t in x) if isinstance(x, tuple) else x[part]


def check_method(name: str) -> None:
    """ConfigError when this process is one of several (``launched()``) and method ``name``
    cannot run that way (before the process group is joined or any data loads)."""
    if launched() and refusal(name):
        raise ConfigError(refusal(name))

