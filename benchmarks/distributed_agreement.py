"""2 gloo processes against 1 process for the trained methods without a test of their own.

Each method learns the first 2 tasks of the tests' tiny stream (``tests/distributed_jobs.py``,
tiny random ViT, 16 px) in 2 processes and in this one (on one thread, as each rank); printed
and written: whether both ranks hold bitwise the same state after every task, and the largest
absolute difference of any state tensor from the 1-process state (with that tensor's largest
magnitude), beside the control: how far the 1-process state moves when the learning rate is
multiplied by 1 + 1e-6 (a method whose 2-process difference is far above its control does not
train the same in 2 processes). ``tests/test_distributed.py`` covers SimpleCIL, RanPAC,
LayUP, EASE, finetune, L2P, CODA-Prompt, APER, SLCA, iCaRL and replay.

    python benchmarks/distributed_agreement.py   # ~5 min on 2 cores

Writes benchmarks/results/distributed_agreement.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

SETTINGS = {  # the conformance suite's fast settings, 2 epochs
    "lwf": {"epochs": 2, "lr": 0.05, "batch_size": 4},
    "ewc": {"epochs": 2, "lr": 0.05, "batch_size": 4, "ewc_lambda": 10.0},
    "joint": {"epochs": 2, "lr": 0.05, "batch_size": 4},
    "dualprompt": {"g_layers": (0,), "e_layers": (1,), "g_length": 2, "e_length": 2,
                   "epochs": 2, "lr": 0.01, "batch_size": 4, "augment": False, "pool_size": 4},
    "dap": {"epochs": 2, "lr": 0.01, "batch_size": 4, "augment": False, "num_tokens": 2},
    "lae": {"blocks": (0, 1), "prefix_length": 2, "epochs": 3, "num_freeze_epochs": 1,
            "lr": 0.01, "batch_size": 4, "augment": False},
    "esn": {"epochs": 2, "lr": 0.01, "batch_size": 4, "augment": False, "prompt_tokens": 4},
    "hide_prompt": {"e_layers": (0,), "prompt_length": 2, "epochs": 2, "lr": 0.01,
                    "head_lr_scale": 1.0, "batch_size": 4, "augment": False, "tii_epochs": 2,
                    "tii_lr": 0.003, "n_centroids": 2, "ca_epochs": 2, "ca_samples": 8,
                    "tii_ca_samples": 8},
}


def worst(a: dict, b: dict) -> tuple[float, float, str]:
    """(largest |a - b|, largest |b| of that tensor, its key) over floating tensors."""
    rows = [(float((a[k].double() - b[k].double()).abs().max()),
             float(b[k].double().abs().max()), k)
            for k in a if a[k].numel() and a[k].is_floating_point()]
    return max(rows)


def main() -> None:
    from distributed_jobs import run_job, same, spawn

    from retain.distributed import Dist

    jobs = {m: ("learn", m, p, 2) for m, p in SETTINGS.items()}
    ranks, _ = spawn(jobs)
    torch.set_num_threads(1)
    out = {}
    for m, job in jobs.items():
        one = run_job(m, job, Dist(), tempfile.mkdtemp())
        diffs = [worst(a, b) for a, b in zip(ranks[0][m], one, strict=True)]
        nudged = job[:2] + (job[2] | {"lr": job[2]["lr"] * (1 + 1e-6)},) + job[3:]
        control = [worst(a, b)[0] for a, b in
                   zip(run_job(m, nudged, Dist(), tempfile.mkdtemp()), one, strict=True)]
        out[m] = {"ranks_identical": all(same(a, b) for a, b in
                                         zip(ranks[0][m], ranks[1][m], strict=True)),
                  "max_abs_diff_per_task": [d for d, _, _ in diffs],
                  "scale_per_task": [s for _, s, _ in diffs],
                  "tensor_per_task": [k for _, _, k in diffs],
                  "control_lr_1e-6_per_task": control}
        print(f"{m:12s} ranks identical {out[m]['ranks_identical']}  vs 1 process: "
              + ", ".join(f"{d:.1e} ({k}, |x| <= {s:.2f})" for d, s, k in diffs)
              + "  control: " + ", ".join(f"{c:.1e}" for c in control), flush=True)
    path = HERE / "results" / "distributed_agreement.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
