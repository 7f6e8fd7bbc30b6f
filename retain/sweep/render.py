"""Renderers of the report: one list of blocks -> markdown, self-contained HTML; rows -> CSV.

Blocks: ("h1"|"h2"|"p", text), ("ol", [text]), ("table", header, rows), ("img", name, png).
Numbers are written by ``pct``/``pm``/``num``, which turn a missing or non-finite value into
"–" (CSV: an empty cell), so no output holds NaN.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math


def finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def pct(x, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}" if finite(x) else "–"


def pm(ms: tuple) -> str:
    mean, std = ms
    if not finite(mean):
        return "–"
    return pct(mean) + (f" ± {pct(std)}" if finite(std) else "")


def num(x, fmt: str = "{:.1f}") -> str:
    return fmt.format(x) if finite(x) else "–"


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(b[1] + "\n")
        elif b[0] == "ol":
            out.append("\n".join(f"{i}. {md_cell(t)}" for i, t in enumerate(b[1], 1)) + "\n")
        elif b[0] == "table":
            _, header, body = b
            lines = ["| " + " | ".join(map(md_cell, header)) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in body]
            out.append("\n".join(lines) + "\n")
        elif b[0] == "img":
            out.append(f"![{b[1]}](report_files/{b[1]})\n")
    return "\n".join(out)


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
       "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
       "tr:nth-child(even){background:#fafafa}img{max-width:100%;display:block;margin:1em 0}")


def to_html(blocks: list) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{e(blocks[0][1])}</title><style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2", "p"):
            parts.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "ol":
            parts.append("<ol>" + "".join(f"<li>{e(t)}</li>" for t in b[1]) + "</ol>")
        elif b[0] == "table":
            _, header, body = b
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row)
                                   + "</tr>" for row in body) + "</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            parts.append(f"<img alt='{e(b[1])}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


CSV_COLUMNS = ["label", "method", "dataset", "scenario", "backbone", "image_size", "seeds", "n",
               "failed", "unfinished", "avg_incremental_accuracy_mean_pct",
               "avg_incremental_accuracy_std_pct", "last_accuracy_mean_pct",
               "last_accuracy_std_pct", "forgetting_mean_pct", "forgetting_std_pct",
               "learn_seconds_mean", "eval_seconds_mean", "backbone_passes_per_image",
               "trainable_parameters", "published_avg_incremental_accuracy_pct",
               "published_last_accuracy_pct", "difference_last_accuracy_pct",
               "published_source", "protocol_flags"]


def to_csv(rows: list[dict]) -> str:
    def val(x, scale=1.0):
        return f"{scale * x:.4f}" if finite(x) else ""

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        p = r["published"]
        src = r.get("source")
        w.writerow([r["label"], r["method"], r["dataset"], r["scenario"], r["backbone"],
                    r["image_size"] or "", " ".join(map(str, r["seeds"])), r["n"], r["failed"],
                    r["unfinished"],
                    *(val(v, 100) for k in ("avg_incremental_accuracy", "last_accuracy",
                                            "forgetting") for v in r[k]),
                    val(r["learn_seconds"]), val(r["eval_seconds"]),
                    val(r["passes_per_image"]),
                    "" if r["trainable"] is None else r["trainable"],
                    val((p.get("avg_incremental_accuracy") or {}).get("value"), 100),
                    val((p.get("last_accuracy") or {}).get("value"), 100),
                    val((p.get("last_accuracy") or {}).get("difference"), 100),
                    f"{src['paper']}; {src['source']}" if src else "",
                    "; ".join(r.get("flags", []))])
    return buf.getvalue()
