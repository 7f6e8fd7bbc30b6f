"""The published numbers shipped with retain (``published.yaml``) and their matching to runs.

Each entry is one published value with its provenance (paper, source with commit and file,
table, backbone checkpoint, metric name) and the protocol facts needed to compare it: the
backbone, the exemplar memory, whether prompts were voted per test batch. ``lookup`` finds the
entries for a (method, hyper-parameters, dataset, scenario); ``protocol_flags`` says where a
run's protocol differs from the entry's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

TABLE_FILE = Path(__file__).with_name("published.yaml")
PROVENANCE = ("paper", "source", "table", "spec", "backbone", "checkpoint", "metric_name")
METRICS = ("avg_incremental_accuracy", "last_accuracy")


@functools.cache
def load_published(path: str | Path = TABLE_FILE) -> tuple[dict, ...]:
    """Every published value as a flat entry: method, params, dataset, scenario, metric, value
    (a fraction), the table's provenance and protocol fields."""
    data = yaml.safe_load(Path(path).read_text())
    entries = []
    for table in data["tables"]:
        missing = [k for k in PROVENANCE + ("id", "metrics", "columns", "rows") if not
                   table.get(k)]
        if missing:
            raise ConfigError(f"{path}: table {table.get('id', '?')} lacks {missing}")
        columns = [parse_column(c, table["backbone"]) for c in table["columns"]]
        for row in table["rows"]:
            entries += row_entries(table, row, columns, path)
    return tuple(entries)


def parse_column(text: str, backbone: str) -> tuple[str, str, str]:
    """'cifar100 B0Inc10' or 'cifar100 B0Inc10 @backbone' -> (dataset, scenario, backbone)."""
    parts = text.split()
    if parts[-1].startswith("@"):
        backbone = parts.pop()[1:]
    dataset, scenario = parts
    return dataset, scenario, backbone


def row_entries(table: dict, row: dict, columns: list, path) -> list[dict]:
    if len(row["values"]) != len(columns):
        raise ConfigError(f"{path}: table {table['id']}, row {row['as_published']}: "
                          f"{len(row['values'])} values for {len(columns)} columns")
    out = []
    for (dataset, scenario, backbone), cell in zip(columns, row["values"], strict=True):
        values = cell if isinstance(cell, list) else [cell]
        for metric, value in zip(table["metrics"], values, strict=True):
            if value is None:
                continue
            out.append({
                "table_id": table["id"], **{k: table[k] for k in PROVENANCE},
                "backbone": row.get("backbone", backbone), "method": row["method"],
                "params": row.get("params", {}), "as_published": row["as_published"],
                "dataset": dataset, "scenario": scenario, "metric": metric,
                "value": value / 100, "memory": row.get("memory", table.get("memory")),
                "batch_vote": row.get("batch_vote"),
                "approximate": bool(row.get("approximate", table.get("approximate", False))),
                "flags": [*table.get("flags", []), *row.get("flags", [])],
                "caveats": table.get("caveats", "")})
    return out


def lookup(method: str, hparams: dict[str, Any], dataset: str, scenario: str,
           metric: str, backbone: str | None = None) -> list[dict]:
    """Entries for this setting and metric, best first: the most specific variant (most
    matching ``params``), then the same backbone, then exact values before plot readings."""
    found = [e for e in load_published() if e["method"] == method and e["dataset"] == dataset
             and e["scenario"] == scenario and e["metric"] == metric
             and all(hparams.get(k) == v for k, v in e["params"].items())]
    return sorted(found, key=lambda e: (-len(e["params"]), e["backbone"] != backbone,
                                        e["approximate"]))


def protocol_flags(entry: dict, *, backbone: str, uses_batch_information: bool,
                   memory: int | None) -> list[str]:
    """Where a run's protocol differs from the published entry's (shown beside the number)."""
    flags = list(entry["flags"])
    if backbone != entry["backbone"]:
        flags.append(f"other backbone (published: {entry['backbone']})")
    vote = entry["batch_vote"]
    if uses_batch_information and vote is not True:
        flags.append("batch vote used here" + (" (unknown in the source)" if vote == "unknown"
                                                else ""))
    elif vote is True and not uses_batch_information:
        flags.append("published run voted per batch")
    elif vote == "unknown":
        flags.append("batch vote unknown in the source")
    if entry["memory"] is not None and memory is not None and memory != entry["memory"]:
        flags.append(f"other memory ({memory} here, {entry['memory']} published)")
    return flags
