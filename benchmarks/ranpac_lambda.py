"""RanPAC's λ search: one factorisation for all candidates vs one dense solve per candidate.

The official code (and PILOT) fits the ridge head for each of the 17 λ ∈ {1e-8, …, 1e8} on 80 %
of the current task's random features with a dense (M, M) solve, scores it on the other 20 %, and
then solves once more with the accumulated Gram matrix: 18 dense solves per task. retain scores
every λ from one thin SVD of the 80 % part (``retain.layers.ridge.lambda_path_errors``) and then
does the one final solve (Cholesky). Same λ, same head.

    python benchmarks/ranpac_lambda.py [--m 10000] [--n 5000] [--classes 10]

Defaults: M = 10,000 random features (RanPAC), n = 5,000 images in the task (CIFAR-100 B0Inc10),
10 classes. Writes benchmarks/results/ranpac_lambda.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from retain.layers.ridge import RANPAC_LAMBDAS, RidgeStatistics, lambda_path_errors


def direct(h_tr, y_tr, h_va, y_va, stats: RidgeStatistics) -> tuple[float, torch.Tensor]:
    """The official procedure: one dense solve per λ, then one with the accumulated G."""
    g, q = h_tr.T @ h_tr, h_tr.T @ y_tr
    eye = torch.eye(len(g), dtype=torch.float64)
    errors = []
    for lam in RANPAC_LAMBDAS:
        w = torch.linalg.solve(g + lam * eye, q)
        errors.append(((h_va @ w - y_va) ** 2).mean())
    best = RANPAC_LAMBDAS[int(torch.stack(errors).argmin())]
    return best, torch.linalg.solve(stats.gram + best * eye, stats.cross)


def path(h_tr, y_tr, h_va, y_va, stats: RidgeStatistics) -> tuple[float, torch.Tensor]:
    errors = lambda_path_errors(h_tr, y_tr, h_va, y_va, RANPAC_LAMBDAS)
    best = RANPAC_LAMBDAS[int(errors.argmin())]
    return best, stats.solve(best)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=10000)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(args.n, 768, generator=g)  # stand-in for ViT features
    w_rand = torch.randn(768, args.m, generator=g)
    h = torch.relu(feats @ w_rand).double()  # (n, M) RanPAC random features
    y = torch.randint(0, args.classes, (args.n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, args.classes).double()
    stats = RidgeStatistics(args.m)
    stats.update(h, y, args.classes)
    cut = int(0.8 * args.n)
    parts = (h[:cut], onehot[:cut], h[cut:], onehot[cut:], stats)
    timings, heads = {}, {}
    for name, fn in (("path (1 SVD + 1 Cholesky)", path), ("direct (18 dense solves)", direct)):
        t0 = time.perf_counter()
        lam, w = fn(*parts)
        timings[name] = time.perf_counter() - t0
        heads[name] = (lam, w)
        print(f"{name}: {timings[name]:.1f} s, λ = {lam:g}", flush=True)
    (l1, w1), (l2, w2) = heads.values()
    rel = float((w1 - w2).norm() / w2.norm())
    t_path, t_direct = timings.values()
    out = {"m": args.m, "n": args.n, "classes": args.classes, "seconds": timings,
           "speedup": t_direct / t_path, "same_lambda": l1 == l2, "head_relative_error": rel,
           "threads": torch.get_num_threads(), "platform": platform.platform()}
    path_out = Path(__file__).parent / "results" / "ranpac_lambda.json"
    path_out.parent.mkdir(exist_ok=True)
    path_out.write_text(json.dumps(out, indent=2))
    print(f"speed-up {out['speedup']:.1f}x; same λ: {out['same_lambda']}; "
          f"head relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
