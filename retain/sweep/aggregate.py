"""The numbers of a report: runs collected from a sweep folder (and any run folders), grouped by
setting (everything but the seed), summarised as mean ± sample std over seeds, and put beside
the published value for that setting.

Every accuracy is recomputed from the per-stage correct/total counts of ``results.json`` with
``retain.metrics``, so ``NaN`` or ``null`` in the stored summaries make no difference. The
standard deviation is the sample one (``ddof=1``, numpy ``std(ddof=1)``); with one seed it is
not given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..config import comparable
from ..report import counts
from . import published as pub
from .status import SWEEP_FILE, read_json_lenient, run_state

METRIC_KEYS = ("avg_incremental_accuracy", "last_accuracy", "forgetting")


@dataclass
class RunRecord:
    name: str
    label: str
    group: str
    run_dir: Path
    state: str
    results: dict | None = None
    error: dict | None = None
    config: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        """Every metric recomputed from the counts (robust to NaN/null in the file)."""
        return metrics.summary(*counts(self.results))


def collect(sweep_dir: Path, run_dirs: list[Path] = ()) -> tuple[dict, list[RunRecord]]:
    """The sweep's plan (or {}) and a record per run: the sweep's points, then ``run_dirs``."""
    sweep_dir = Path(sweep_dir)
    plan = read_json_lenient(sweep_dir / SWEEP_FILE) if (sweep_dir / SWEEP_FILE).is_file() else {}
    records = [record(Path(p["config"]["out"]), p["name"], p["label"], p["group"], p["config"])
               for p in plan.get("points", [])]
    if not plan:  # a plain folder of runs: DIR/*/results.json and DIR/runs/*/results.json
        run_dirs = [*sorted(p.parent for p in sweep_dir.glob("*/results.json")),
                    *sorted(p.parent for p in sweep_dir.glob("runs/*/results.json")),
                    *run_dirs]
    known = {r.run_dir.resolve() for r in records}
    for d in map(Path, run_dirs):
        if d.resolve() not in known:
            records.append(loose_record(d))
            known.add(d.resolve())
    return plan, records


def record(run_dir: Path, name: str, label: str, group: str, config: dict) -> RunRecord:
    st = run_state(run_dir)
    rec = RunRecord(name, label, group, run_dir, st["state"], error=st.get("error"),
                    config=config)
    if st["stages"]:
        rec.results = read_json_lenient(run_dir / "results.json")
    return rec


def loose_record(run_dir: Path) -> RunRecord:
    """A run folder outside the sweep: labelled by its method and explicit parameters."""
    res = run_dir / "results.json"
    if not res.is_file():
        from ..errors import ConfigError

        raise ConfigError(f"no results.json in {run_dir}; pass folders written by retain run")
    config = read_json_lenient(res)["config"]
    params = ",".join(f"{k}={v}" for k, v in sorted(config.get("params", {}).items()))
    label = config["method"] + (f"({params})" if params else "")
    setting = {k: v for k, v in comparable(config).items() if k != "seed"}
    group = f"{label}|{json.dumps(setting, sort_keys=True, default=str)}"
    return record(run_dir, run_dir.name, label, group, config)


# -------------------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; None when absent."""
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(x):
        return None, None
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def summarise(runs: list[RunRecord]) -> dict[str, Any]:
    """One row of the report for the runs of one setting (different seeds)."""
    done = [r for r in runs if r.state == "done"]
    first = (done or runs)[0]
    cfg = first.config
    row: dict[str, Any] = {
        "label": first.label, "method": cfg.get("method"), "dataset": cfg.get("dataset"),
        "scenario": cfg.get("scenario"), "backbone": cfg.get("backbone"),
        "image_size": cfg.get("image_size"), "n": len(done),
        "seeds": sorted(r.config.get("seed") for r in done),
        "failed": sum(r.state == "failed" for r in runs),
        "unfinished": sum(r.state in ("partial", "pending") for r in runs)}
    sums = [r.summary for r in done]
    for key in METRIC_KEYS:
        row[key] = mean_std([s[key] for s in sums])
    row["learn_seconds"] = mean_std([stage_sum(r, "seconds_learn") for r in done])[0]
    row["eval_seconds"] = mean_std([stage_sum(r, "seconds_eval") for r in done])[0]
    row["passes_per_image"] = mean_std([passes_per_image(r) for r in done])[0]
    row["trainable"] = last_stage(done, "trainable")
    row["uses_batch_information"] = any(r.results.get("uses_batch_information") for r in done)
    row["curve"] = curve(done)
    row.update(published_for(row, done))
    return row


def stage_sum(r: RunRecord, key: str) -> float:
    return float(sum(s.get(key) or 0.0 for s in r.results["stages"]))


def passes_per_image(r: RunRecord) -> float | None:
    """Frozen backbone passes the run made itself (the cache's ``images_embedded``) per image
    of its dataset; 0 when every feature came from the cache."""
    size = (r.results.get("environment") or {}).get("dataset_size")
    if not size:
        return None
    return stage_sum(r, "images_embedded") / (size["train"] + size["test"])


def last_stage(done: list[RunRecord], key: str) -> int | None:
    vals = [(r.results["stages"][-1].get("parameters") or {}).get(key) for r in done]
    vals = [v for v in vals if v is not None]
    return int(round(np.mean(vals))) if vals else None


def curve(done: list[RunRecord]) -> dict | None:
    """Classes seen per stage and the mean / std over seeds of the accuracy on seen classes."""
    if not done:
        return None
    acc = np.array([r.summary["seen_accuracy"] for r in done])  # (seeds, stages)
    return {"classes": [s["num_classes"] for s in done[0].results["stages"]],
            "mean": acc.mean(0).tolist(),
            "std": (acc.std(0, ddof=1) if len(done) > 1 else np.zeros(acc.shape[1])).tolist()}


def memory_of(r: RunRecord) -> int | None:
    if "upper_bound" in r.results.get("tags", []):
        return None
    if "uses_memory" not in r.results.get("tags", []):
        return 0
    return (r.results.get("hparams") or {}).get("memory_size")


def published_for(row: dict, done: list[RunRecord]) -> dict:
    """The published A_B (and Ā from the same table where it has one), difference and flags."""
    if not done:
        return {"published": {}}
    r = done[0]
    found = {m: pub.lookup(row["method"], r.results.get("hparams") or {}, row["dataset"],
                           row["scenario"], m, row["backbone"]) for m in pub.METRICS}
    best = found["last_accuracy"][:1] or found["avg_incremental_accuracy"][:1]
    if not best:
        return {"published": {}}
    table = best[0]["table_id"]
    out = {}
    for m, entries in found.items():
        same = [e for e in entries if e["table_id"] == table]
        if same:
            e = same[0]
            ours = row[m][0]
            out[m] = {**e, "difference": None if ours is None else ours - e["value"]}
    flags = pub.protocol_flags(best[0], backbone=row["backbone"],
                               uses_batch_information=row["uses_batch_information"],
                               memory=memory_of(r))
    return {"published": out, "flags": flags, "source": best[0]}


def groups(records: list[RunRecord]) -> list[list[RunRecord]]:
    """Runs of one setting together, in the order of first appearance."""
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.group, []).append(r)
    return list(out.values())


def environments(records: list[RunRecord]) -> dict[str, Any]:
    """The fingerprints of the finished runs: software/hardware, weights and data keys."""
    envs: dict[tuple, int] = {}
    weights: dict[str, set] = {}
    data: dict[str, set] = {}
    for r in records:
        if not r.results:
            continue
        e = r.results.get("environment") or {}
        key = tuple(str(e.get(k) or "–") for k in ENV_FIELDS)
        envs[key] = envs.get(key, 0) + 1
        b = r.results.get("backbone") or {}
        weights.setdefault(b.get("name", "?"), set()).add(b.get("sha256", "?"))
        dk = e.get("dataset_key") or {}
        data.setdefault(r.config.get("dataset", "?"), set()).add(
            f"train {dk.get('train', '?')}, test {dk.get('test', '?')}")
    return {"fields": ENV_FIELDS, "rows": [(*k, n) for k, n in envs.items()],
            "weights": {k: sorted(v) for k, v in weights.items()},
            "data": {k: sorted(v) for k, v in data.items()}}


ENV_FIELDS = ("python", "torch", "timm", "numpy", "device", "gpu", "cpu", "retain_commit")
