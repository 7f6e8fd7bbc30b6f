"""``retain report SWEEP_DIR [RUN_DIR...]``: report.md, report.html (one self-contained file,
figures embedded as base64 PNG) and results.csv.

Per setting (method, dataset, scenario, backbone): seeds, Ā / A_B / forgetting as mean ± sample
std (ddof = 1), learn and evaluation time, frozen-backbone passes per image, trainable
parameters; the published number beside it with its source, the difference and the protocol
differences; the failed and unfinished runs; the feature-cache warm-ups; the environment
fingerprints (versions, device, weights sha256, dataset content keys). Both documents are built
from one list of blocks, so they say the same thing. No file holds NaN: missing values are
empty (CSV) or "–".
"""

from __future__ import annotations

from pathlib import Path

from ..io import write_bytes
from . import plots
from .aggregate import collect, environments, groups, summarise
from .render import finite, num, pct, pm, to_csv, to_html, to_markdown
from .status import read_json_lenient

STD_NOTE = ("mean ± sample standard deviation over seeds (numpy std with ddof = 1; none with "
            "one seed); accuracies recomputed from the per-stage counts of each results.json")


def write_report(sweep_dir: str | Path, run_dirs: list[str | Path] = (),
                 out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the three files (and the PNGs the markdown links to); returns their paths."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir or sweep_dir)
    plan, records = collect(sweep_dir, [Path(d) for d in run_dirs])
    rows = [summarise(g) for g in groups(records)]
    figures = make_figures(rows)
    blocks = document(plan, records, rows, figures, sweep_dir)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "results.csv"}
    for name, png in figures.items():
        write_bytes(out / "report_files" / name, png)
    write_bytes(paths["md"], to_markdown(blocks).encode())
    write_bytes(paths["html"], to_html(blocks).encode())
    write_bytes(paths["csv"], to_csv(rows).encode())
    return paths


# --------------------------------------------------------------------------------- document


def make_figures(rows: list[dict]) -> dict[str, bytes]:
    figs = {}
    settings: dict[tuple, list[dict]] = {}
    for r in rows:
        settings.setdefault((r["dataset"], r["scenario"], r["backbone"]), []).append(r)
    for (ds, sc, bb), rs in settings.items():
        if any(r["curve"] for r in rs):
            figs[safe(f"curves-{ds}-{sc}-{bb}.png")] = plots.curves(rs, f"{ds} {sc} · {bb}")
    if any(r["n"] for r in rows):
        figs["last_accuracy_vs_published.png"] = plots.bars(rows)
    return figs


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def document(plan: dict, records, rows: list[dict], figures: dict, sweep_dir: Path) -> list:
    states = [r.state for r in records]
    skipped = plan.get("skipped") or {}
    blocks: list = [("h1", f"Sweep report: {sweep_dir.name}")]
    if plan.get("description"):
        blocks.append(("p", plan["description"]))
    blocks += [("p", (
        f"{len(records)} runs: {states.count('done')} finished, {states.count('failed')} "
        f"failed, {states.count('partial') + states.count('pending')} unfinished"
        + (f", {len(skipped)} skipped (data or weights not available)" if skipped else "")
        + f". Values: {STD_NOTE}."))]
    sources = numbered_sources(rows)
    blocks += [("h2", "Results"), results_table(rows, sources)]
    blocks.append(("p", "Ā: mean accuracy over the stages; A_B: accuracy on all classes after "
                   "the last task; forgetting: Chaudhry et al. 2018; learn/eval: seconds per "
                   "run; passes/img: frozen-backbone passes the run made itself per image of "
                   "its dataset (0: all from the shared cache)"
                   + ("; Δ: this sweep minus published (percentage points); protocol: where "
                      "this setting differs from the published one." if sources else
                      ". The published table (retain/sweep/published.yaml) has no number for "
                      "these method, dataset and scenario settings.")))
    blocks += problem_blocks(records, skipped)
    blocks += cache_blocks(sweep_dir, records)
    blocks += environment_blocks(records)
    if figures:
        blocks.append(("h2", "Figures"))
        blocks += [("img", name, png) for name, png in figures.items()]
    if sources:
        blocks += [("h2", "Sources of the published numbers"), ("ol", [
            f"{e['paper']}; {e['table']}; {e['source']}; backbone {e['checkpoint']}; metric "
            f"{e['metric_name']}; spec {e['spec']}"
            + (f"; caveats: {e['caveats']}" if e.get("caveats") else "")
            for e in sources.values()])]
    return blocks


def numbered_sources(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("source"):
            out.setdefault(r["source"]["table_id"], r["source"])
    return out


def published_cell(row: dict, metric: str, sources: dict) -> str:
    e = row["published"].get(metric)
    if not e:
        return "–"
    ref = list(sources).index(e["table_id"]) + 1
    return f"{'≈' if e['approximate'] else ''}{pct(e['value'])} [{ref}]"


def results_table(rows: list[dict], sources: dict) -> tuple:
    """The main table; the published columns only when some setting has a published number."""
    header = ["method", "dataset", "scenario", "backbone", "seeds", "Ā (%)", "A_B (%)",
              "forgetting (%)", "learn (s)", "eval (s)", "passes/img", "trainable",
              "published Ā", "published A_B", "Δ A_B", "protocol"]
    width = len(header) if sources else len(header) - 4
    body = []
    for r in rows:
        diff = (r["published"].get("last_accuracy") or {}).get("difference")
        seeds = f"{r['n']}" + (f" ({r['failed']} failed)" if r["failed"] else "") + (
            f" ({r['unfinished']} unfinished)" if r["unfinished"] else "")
        body.append([r["label"], r["dataset"], r["scenario"], backbone_text(r), seeds,
                     pm(r["avg_incremental_accuracy"]), pm(r["last_accuracy"]),
                     pm(r["forgetting"]), num(r["learn_seconds"]), num(r["eval_seconds"]),
                     num(r["passes_per_image"], "{:.2f}"),
                     f"{r['trainable']:,}" if r["trainable"] is not None else "–",
                     published_cell(r, "avg_incremental_accuracy", sources),
                     published_cell(r, "last_accuracy", sources),
                     f"{100 * diff:+.2f}" if finite(diff) else "–",
                     "; ".join(f"⚠ {f}" for f in r.get("flags", []))][:width])
    return ("table", header[:width], body)


def backbone_text(r: dict) -> str:
    return r["backbone"] + (f" @{r['image_size']}px" if r.get("image_size") else "")


def problem_blocks(records, skipped: dict) -> list:
    failed = [r for r in records if r.state == "failed"]
    unfinished = [r for r in records if r.state in ("partial", "pending")]
    blocks: list = []
    if failed:
        blocks += [("h2", "Failed runs"), ("table", ["run", "error", "message"], [
            [r.name, (r.error or {}).get("error", "?"),
             ((r.error or {}).get("message") or "").splitlines()[0][:300] if (r.error or {})
             .get("message") else ""] for r in failed])]
    if unfinished:
        blocks += [("h2", "Unfinished runs"), ("p", "Run the same sweep command again to "
                   "finish them (they resume after their last task)."),
                   ("table", ["run", "tasks learned"], [
                       [r.name, str(len(r.results["stages"])) if r.results else "0"]
                       for r in unfinished])]
    if skipped:
        blocks += [("h2", "Skipped (data or weights not available)"), ("table", [
            "run", "reason"], [[k, v.splitlines()[0][:300]] for k, v in skipped.items()])]
    return blocks


def cache_blocks(sweep_dir: Path, records) -> list:
    path = sweep_dir / "warmup.json"
    if not path.is_file():
        return []
    own = sum(sum(s.get("images_embedded") or 0 for s in r.results["stages"])
              for r in records if r.results)
    body = [[w["dataset"], w["backbone"], str(w.get("image_size") or "default"),
             str(w.get("images_embedded", "failed")), str(w.get("images", "–")),
             str(w.get("runs", "–")), num(w.get("seconds"), "{:.0f}")]
            for w in read_json_lenient(path)]
    return [("h2", "Shared feature cache"), ("p", (
        "Before the runs, each (dataset, backbone, image size) was embedded once into the "
        "shared cache; the runs read those features. Warm-ups of every invocation of the "
        f"sweep are listed (a resumed sweep finds the images already embedded). The runs "
        f"themselves embedded {own} images (adapted networks, other layers, or images not "
        "warmed).")), ("table", ["dataset", "backbone", "image size", "embedded",
                                 "images", "runs", "seconds"], body)]


def environment_blocks(records) -> list:
    env = environments(records)
    if not env["rows"]:
        return []
    return [("h2", "Environment"),
            ("table", [*env["fields"], "runs"], [[str(v) for v in row] for row in env["rows"]]),
            ("table", ["backbone", "weights sha256"],
             [[k, ", ".join(v)] for k, v in env["weights"].items()]),
            ("table", ["dataset", "content keys"],
             [[k, "; ".join(v)] for k, v in env["data"].items()])]
