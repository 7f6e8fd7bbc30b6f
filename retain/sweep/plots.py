"""The report's figures as PNG bytes: accuracy curves per setting (mean with a ±std band over
seeds) and A_B per method beside the published number."""

from __future__ import annotations

import io


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def curves(rows: list[dict], title: str) -> bytes:
    """Accuracy on the classes seen so far against classes seen, one line per method."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for row in rows:
        c = row["curve"]
        if not c:
            continue
        mean = [100 * v for v in c["mean"]]
        std = [100 * v for v in c["std"]]
        line, = ax.plot(c["classes"], mean, marker="o", ms=3,
                        label=f"{row['label']} (n={row['n']})")
        ax.fill_between(c["classes"], [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.18, lw=0)
    ax.set(xlabel="classes seen", ylabel="top-1 accuracy on seen classes (%)", title=title,
           ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def bars(rows: list[dict]) -> bytes:
    """A_B mean ± std per setting (horizontal bars) with the published A_B beside it."""
    rows = [r for r in rows if r["last_accuracy"][0] is not None]
    pub = [r["published"].get("last_accuracy") for r in rows]
    shift = 0.2 if any(pub) else 0.0
    fig = _figure(7.0, 1.6 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot()
    names = [f"{r['label']} · {r['dataset']} {r['scenario']} · {r['backbone']}" for r in rows]
    y = list(range(len(rows)))
    ours = [100 * r["last_accuracy"][0] for r in rows]
    err = [100 * (r["last_accuracy"][1] or 0) for r in rows]
    ax.barh([v + shift for v in y], ours, height=0.8 - 2 * shift, xerr=err, capsize=2,
            label="this sweep (mean ± std)", color="#3b75af")
    if any(pub):
        ax.barh([v - shift for v in y], [100 * p["value"] if p else 0 for p in pub],
                height=0.4, label="published", color="#e08a3c", hatch="//")
        for v, p in zip(y, pub, strict=True):
            if not p:
                ax.text(1, v - shift, "no published number", va="center", fontsize=6,
                        color="#555")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2,
                  frameon=False)
    else:
        ax.set_title("A_B, mean ± std over seeds (no published number for these settings)",
                     fontsize=8)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="A_B: accuracy on all classes after the last task (%)", xlim=(0, 100))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
