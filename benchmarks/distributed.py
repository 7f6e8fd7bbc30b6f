"""Embedding and training throughput of 1 and N processes (``retain.distributed``), and agreement.

Each setting starts ``N`` processes the way torchrun would (gloo on the CPU, NCCL on GPUs with
``--device cuda``: process r uses cuda:r), then measures, after a warm-up:

- **embed**: ``FeatureCache().features`` of the first ``--images`` training images of digits
  (memory cache, so every image is embedded once in total across the processes);
- **train**: ``training.fit`` of a copy of the backbone with a linear head for ``--steps`` steps of
  a global batch ``--batch`` (each process its share, gradients summed).

It reports images per second (of the whole group: images / wall time of the slowest process) and
the largest difference of the features and of the trained parameters from the 1-process run.

    python benchmarks/distributed.py --procs 1 2 --label cpu-2core
    python benchmarks/distributed.py --device cuda --procs 1 2 4 8 --label gpu8 \\
        --backbone vit_base_patch16_224 --image-size 224   # GPUs (offline weights: --weights)

Writes benchmarks/results/distributed-<label>.json and prints a markdown table. On a 2-core CPU
no speed-up is expected (both processes share the same two cores): the point there is that the
group runs and agrees with one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def measure(args, dist, device) -> dict:
    from torch import nn

    from retain.backbones import create_backbone
    from retain.context import Context
    from retain.datasets import create_dataset
    from retain.features import FeatureCache
    from retain.training import fit, image_inputs

    split = create_dataset("digits").load().train
    split = split.subset(range(min(args.images, len(split))))
    bb = create_backbone(args.backbone, args.weights, args.image_size)
    ctx = Context(device=device, batch_size=args.eval_batch, cache=FeatureCache(), dist=dist,
                  progress=False)
    ctx.features(bb, split.subset(range(args.eval_batch)))  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    feats = ctx.features(bb, split)  # (N, D)
    dist.barrier()
    t_embed = time.perf_counter() - t0

    torch.manual_seed(0)
    model = nn.Sequential(create_backbone(args.backbone, args.weights, args.image_size).model,
                          nn.Linear(bb.feature_dim, 10))
    model.requires_grad_(True)
    n = args.steps * args.batch
    sub = split.subset(range(n))
    targets = torch.from_numpy(sub.targets)
    g = torch.Generator().manual_seed(0)
    fit(model, image_inputs(bb, sub), targets[:args.batch], ctx, epochs=1, lr=0.01,
        batch_size=args.batch, generator=g)  # warm-up step
    dist.barrier()
    t0 = time.perf_counter()
    fit(model, image_inputs(bb, sub), targets, ctx, epochs=1, lr=0.01, batch_size=args.batch,
        generator=g)
    dist.barrier()
    t_train = time.perf_counter() - t0
    params = torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()])
    return {"embed_seconds": t_embed, "embed_images": len(split), "train_seconds": t_train,
            "train_images": n, "features": feats, "params": params,
            "embedded_here": ctx.cache.images_embedded}


def worker(rank: int, world: int, port: int, args, folder: str) -> None:
    import torch.distributed as td

    from retain.distributed import Dist

    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device("cpu")
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if args.device == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(rank)
        td.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank,
                              world_size=world, timeout=datetime.timedelta(seconds=600))
        dist = Dist.from_env(device)
    else:
        dist = Dist()
        device = torch.device(args.device)
    out = measure(args, dist, device)
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    if world > 1:
        td.destroy_process_group()


def run_group(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp(prefix="retain-bench-dist-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args, folder), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backbone", default="vit_tiny_random")
    p.add_argument("--weights", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="images embedded")
    p.add_argument("--eval-batch", type=int, default=32, help="batch of frozen passes")
    p.add_argument("--batch", type=int, default=32, help="global training batch")
    p.add_argument("--steps", type=int, default=8, help="training steps measured")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared by the processes of a group")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()

    rows, base = [], None
    for world in args.procs:
        ranks = run_group(world, args)
        r0 = ranks[0]
        if base is None:
            base = r0
        rows.append({
            "processes": world,
            "embed_images_per_s": r0["embed_images"] / max(r["embed_seconds"] for r in ranks),
            "train_images_per_s": r0["train_images"] / max(r["train_seconds"] for r in ranks),
            "images_embedded_total": sum(r["embedded_here"] for r in ranks),
            "features_max_diff_vs_first": float((r0["features"] - base["features"]).abs().max()),
            "params_max_diff_vs_first": float((r0["params"] - base["params"]).abs().max()),
            "ranks_identical": all(torch.equal(r["params"], r0["params"]) and
                                   torch.equal(r["features"], r0["features"]) for r in ranks)})
    result = {"label": args.label, "device": args.device, "backbone": args.backbone,
              "image_size": args.image_size, "images": args.images, "global_batch": args.batch,
              "steps": args.steps, "threads": args.threads, "cpu_count": os.cpu_count(),
              "machine": platform.platform(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
              "load_average_1min_at_end": os.getloadavg()[0],
              "rows": rows}
    out = HERE / "results" / f"distributed-{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| processes | embed img/s | train img/s | embedded in total | feature diff | "
          "param diff | ranks identical |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['embed_images_per_s']:.1f} | "
              f"{r['train_images_per_s']:.1f} | {r['images_embedded_total']} | "
              f"{r['features_max_diff_vs_first']:.1e} | {r['params_max_diff_vs_first']:.1e} | "
              f"{r['ranks_identical']} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
