"""Work that tests/test_distributed.py runs in one process and in 2 gloo processes.

``spawn(jobs, world)`` starts ``world`` processes on 127.0.0.1 (the environment torchrun would
set), joins one gloo group, runs every job in each and returns, per rank, {job name: output}.
The same job functions called without that environment are the one-process reference.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path

import torch
from conftest import tiny_bundle

from retain.backbones import create_backbone
from retain.context import Context
from retain.distributed import Dist
from retain.features import FeatureCache
from retain.scenarios import ClassIncremental

BACKBONE = {"backbone": "vit_tiny_random", "image_size": 16}


class Counted:
    """Images put through the frozen backbone by the feature cache while active."""

    def __enter__(self):
        import retain.features as features

        self.rows, self._chunks, self._mod = 0, features.embed_chunks, features

        def counting(backbone, split, index, **kw):
            self.rows += len(index)
            return self._chunks(backbone, split, index, **kw)

        features.embed_chunks = counting
        return self

    def __exit__(self, *exc):
        self._mod.embed_chunks = self._chunks


def register_tiny_dataset() -> str:
    from retain.datasets import DATASETS, Dataset

    class TinySynthetic(Dataset):
        name, num_classes, description = "tiny_synthetic", 6, "tests only: tiny_bundle()"

        def load(self):
            return tiny_bundle()

    DATASETS._entries[TinySynthetic.name] = TinySynthetic
    return TinySynthetic.name


def whole_run(method: str, params: dict, out: str, cache_dir: str | None = None) -> dict:
    """A ``retain.runner.run`` of ``method`` on the tiny stream (B0Inc2, 3 tasks): its results,
    the method's state after every task (this process's), and the rows this process embedded."""
    from retain import runner
    from retain.config import RunConfig

    states, learn = [], runner.learn_and_evaluate

    def recording(r, task):
        stage, state = learn(r, task)
        states.append({k: v.clone() for k, v in state.items()})
        return stage, state

    config = RunConfig(method=method, params=params, dataset=register_tiny_dataset(),
                       scenario="B0Inc2", device="cpu", batch_size=16, out=out,
                       cache=cache_dir is not None, cache_dir=cache_dir, **BACKBONE)
    runner.learn_and_evaluate = recording
    try:
        with Counted() as counted:
            results = runner.run(config, echo=lambda *_: None, progress=False)
    finally:
        runner.learn_and_evaluate = learn
    return {"matrix": results["accuracy_matrix"], "states": states, "embedded": counted.rows,
            "stages": results["stages"]}


def learn_tasks(method: str, params: dict, tasks: int, dist: Dist) -> list[dict]:
    """The state of ``method`` after each of its first ``tasks`` tasks of the tiny stream."""
    from retain.methods import create_method
    from retain.runner import seed_everything

    scenario = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    m = create_method(method, create_backbone(BACKBONE["backbone"],
                                              image_size=BACKBONE["image_size"]), **params)
    ctx = Context(device="cpu", batch_size=16, seed=1993, cache=FeatureCache(), dist=dist,
                  progress=False)
    out = []
    for task in scenario[:tasks]:
        seed_everything(1993, task.id)
        m.learn(task, ctx)
        out.append({k: v.clone() for k, v in m.state_dict().items()})
    return out


def coupled_step(shard: str, n: int, dist: Dist) -> dict:
    """Gradients after ``training.backward_share`` of one batch of ``n`` rows through a linear
    map with dropout, under an in-batch B x B contrastive loss (every sample against every
    other): exact across ranks only where the shard mode gathers or replicates."""
    import torch.nn.functional as F

    from retain.training import backward_share, seeded

    g = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4),
                                    torch.nn.Dropout(0.5 * (shard == "replicate")))
    x, y = torch.randn(n, 5, generator=g), torch.arange(n) % 3

    def contrast(z, y):  # (B, 4): CLIP-style, each row's positive is itself
        z = F.normalize(z, dim=-1)
        return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z))) + F.cross_entropy(z[:, :3], y)

    ctx = Context(device="cpu", batch_size=16, seed=1993, cache=FeatureCache(), dist=dist,
                  progress=False)
    with seeded(torch.Generator().manual_seed(3), ctx.device):
        part = backward_share(model, contrast, x, y, ctx, list(model.parameters()), shard)
    return {"loss": torch.tensor(dist.sum(part))} | \
        {k: p.grad.clone() for k, p in model.named_parameters()}


def run_job(name: str, job: tuple, dist: Dist, folder: str) -> object:
    kind, *args = job
    if kind == "coupled":
        return coupled_step(*args, dist=dist)
    if kind == "run":
        method, params, cached = args
        cache = str(Path(folder) / "cache") if cached else None
        return whole_run(method, params, str(Path(folder) / f"run-{name}"), cache)
    if kind == "learn":
        return learn_tasks(*args, dist=dist)
    if kind == "learn-on":  # a method on another backbone and scenario
        return learn_on(*args, dist=dist)
    if kind == "learn-with":  # a method on another backbone than BACKBONE's
        return learn_tasks_on(*args, dist=dist)
    if kind == "last-gradients":
        return last_gradients(*args, dist=dist)
    raise ValueError(kind)


def _worker(rank: int, world: int, port: int, jobs: dict, folder: str) -> None:
    import torch.distributed as td

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world,
                          timeout=datetime.timedelta(seconds=180))
    dist = Dist.from_env()
    out = {name: run_job(name, job, dist, folder) for name, job in jobs.items()}
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    td.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(jobs: dict, world: int = 2) -> tuple[list[dict], str]:
    """Per rank {job name: output} of ``jobs`` run in ``world`` gloo processes; and the folder
    they worked in (the run folders, written by rank 0)."""
    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp(prefix="retain-dist-")
    mp.spawn(_worker, args=(world, free_port(), jobs, folder), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False)
            for r in range(world)], folder


def max_difference(a: dict, b: dict, relative: bool = False) -> float:
    """The largest absolute difference between two state dicts with the same keys and shapes
    (``relative``: of each tensor, divided by the largest magnitude of ``b``'s)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].numel():
            diff = float((a[k].double() - b[k].double()).abs().max())
            scale = float(b[k].double().abs().max()) if relative else 1.0
            worst = max(worst, diff / max(scale, 1e-12))
    return worst


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- methods on another backbone / scenario (own loops, CLIP, raw pixels) ---------------------
def learn_on(method: str, params: dict, tasks: int, backbone: str, scenario: str,
             dist: Dist) -> list[dict]:
    """As ``learn_tasks``, on backbone ``backbone`` (16 px) and the tiny stream as ``scenario``
    (e.g. "TIL-B0Inc2" for the task-incremental methods on raw pixels)."""
    from retain.methods import create_method
    from retain.runner import seed_everything
    from retain.scenarios import make_scenario

    m = create_method(method, create_backbone(backbone, image_size=16), **params)
    ctx = Context(device="cpu", batch_size=16, seed=1993, cache=FeatureCache(), dist=dist,
                  progress=False)
    out = []
    for task in make_scenario(tiny_bundle(), scenario)[:tasks]:
        seed_everything(1993, task.id)
        m.learn(task, ctx)
        out.append({k: v.clone() for k, v in m.state_dict().items()})
    return out


def learn_tasks_on(backbone: str, method: str, params: dict, tasks: int, dist: Dist
                   ) -> list[dict]:
    """``learn_tasks`` with ``backbone`` (at 16 px) instead of BACKBONE's."""
    return learn_on(method, params, tasks, backbone, "B0Inc2", dist=dist)


def last_gradients(backbone: str, method: str, params: dict, dist: Dist) -> dict:
    """The gradients of ``method``'s parameters at its last optimiser step on task 0 (Adam's
    steps hardly change when a gradient is scaled: this sees a term counted twice)."""
    from retain.methods import create_method
    from retain.runner import seed_everything

    task = ClassIncremental(tiny_bundle(), increment=2, seed=1993)[0]
    m = create_method(method, create_backbone(backbone, image_size=16), **params)
    ctx = Context(device="cpu", batch_size=16, seed=1993, cache=FeatureCache(), dist=dist,
                  progress=False)
    grads: dict = {}

    def record(opt, *_):
        grads.clear()
        grads.update({f"{i}": p.grad.clone() for i, p in
                          enumerate(p for g in opt.param_groups for p in g["params"])
                          if p.grad is not None})

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record)
    try:
        seed_everything(1993, task.id)
        m.learn(task, ctx)
    finally:
        hook.remove()
    return grads
