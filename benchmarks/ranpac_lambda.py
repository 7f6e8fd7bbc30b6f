"""RanPAC's λ search: one factorisation for all candidates vs one dense solve per candidate.

The official code (and PILOT) fits the ridge head for each of the 17 λ ∈ {1e-8, …, 1e8} on 80 %
of the current task's random features with a dense (M, M) solve, scores it on the other 20 %, and
then solves once more with the accumulated Gram matrix: 18 dense solves per task. retain scores
every λ from one eigendecomposition of the 80 % part (of HHᵀ, n x n, when n < M;
``retain.layers.ridge.lambda_path_errors``) and then does the one final solve (Cholesky).
Same λ, same head.

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


def direct_search(h_tr, y_tr, h_va, y_va) -> float:
    """The official procedure: one dense (M, M) solve per λ."""
    g, q = h_tr.T @ h_tr, h_tr.T @ y_tr
    eye = torch.eye(len(g), dtype=torch.float64)
    errors = []
    for lam in RANPAC_LAMBDAS:
        w = torch.linalg.solve(g + lam * eye, q)
        errors.append(((h_va @ w - y_va) ** 2).mean())
    return RANPAC_LAMBDAS[int(torch.stack(errors).argmin())]


def path_search(h_tr, y_tr, h_va, y_va) -> float:
    """retain: one eigendecomposition for every λ."""
    return RANPAC_LAMBDAS[int(lambda_path_errors(h_tr, y_tr, h_va, y_va, RANPAC_LAMBDAS).argmin())]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


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
    parts = (h[:cut], onehot[:cut], h[cut:], onehot[cut:])
    eye = torch.eye(args.m, dtype=torch.float64)
    lam_path, t_path = timed(path_search, *parts)
    print(f"search, one eigendecomposition: {t_path:.1f} s, λ = {lam_path:g}", flush=True)
    w_path, t_chol = timed(stats.solve, lam_path)
    print(f"final solve (Cholesky of G + λI): {t_chol:.1f} s", flush=True)
    lam_direct, t_direct = timed(direct_search, *parts)
    print(f"search, 17 dense solves: {t_direct:.1f} s, λ = {lam_direct:g}", flush=True)
    w_direct, t_lu = timed(torch.linalg.solve, stats.gram + lam_direct * eye, stats.cross)
    print(f"final solve (dense LU, official): {t_lu:.1f} s", flush=True)
    rel = float((w_path - w_direct).norm() / w_direct.norm())
    out = {"m": args.m, "n": args.n, "classes": args.classes,
           "seconds": {"search_path": t_path, "final_cholesky": t_chol,
                       "search_direct": t_direct, "final_lu": t_lu},
           "speedup_search": t_direct / t_path,
           "speedup_per_task": (t_direct + t_lu) / (t_path + t_chol),
           "same_lambda": lam_path == lam_direct, "head_relative_error": rel,
           "threads": torch.get_num_threads(), "platform": platform.platform()}
    path_out = Path(__file__).parent / "results" / "ranpac_lambda.json"
    path_out.parent.mkdir(exist_ok=True)
    path_out.write_text(json.dumps(out, indent=2))
    print(f"speed-up of the λ search {out['speedup_search']:.1f}x; per task (search + final "
          f"solve) {out['speedup_per_task']:.1f}x; same λ: {out['same_lambda']}; head relative "
          f"difference {rel:.2e}")


if __name__ == "__main__":
    main()
