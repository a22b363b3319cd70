"""`--plot`: pictures of a run, so a user sees where channels went and picks a trade-off.

One run: kept channels against size per group, and for a bound search (--max-error,
--max-accuracy-drop, --min-agreement) the fidelity-vs-FLOPs points the bisection explored.
A list of ratios: fidelity against kept FLOPs, one point per ratio, beside the kept channels
of every group at each ratio. matplotlib is an optional extra (``pip install
"onnxslim-fr[plot]"``); `require()` refuses early, before any slimming, when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import UsageError
from .report import Report


def require(path: str | os.PathLike[str]) -> None:
    """Exit-2 refusal, before any heavy work, when matplotlib is not installed or cannot
    write `path`'s format."""
    try:
        import matplotlib.figure
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "onnxslim-fr[plot]"') from None
    kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    kind = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if kind not in kinds:
        raise UsageError(f"--plot {path}: unknown image format {kind!r}; use one of "
                         f"{', '.join(sorted(kinds))}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def fidelity(rep: Report | dict) -> tuple[str, float | None]:
    """The figure a user judges by: top-1 agreement for classifiers, else max rel error."""
    row = rep if isinstance(rep, dict) else {"top1_agreement": rep.top1_agreement,
                                             "max_rel_error": rep.max_rel_error}
    if row.get("top1_agreement") is not None:
        return "top-1 agreement with the original", row["top1_agreement"]
    return "max relative output error", row.get("max_rel_error")


def write(path: str | os.PathLike[str], rep: Report) -> None:
    """Kept channels per group, and the search curve when the run was a bound search."""
    plt = _pyplot()
    panels = 2 if rep.search else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    _groups(axes[0][0], [("kept", rep.groups)])
    if rep.search:
        ax = axes[0][1]
        label = fidelity(rep.search[0])[0]
        for ok, color, name in ((True, "tab:green", "within the bound"),
                                (False, "tab:red", "outside")):
            pts = [(p["flops_kept"], fidelity(p)[1]) for p in rep.search if p["within"] is ok]
            if pts:
                ax.scatter(*zip(*pts, strict=True), color=color, label=name)
        ax.scatter([rep.after.flops / max(rep.before.flops, 1)], [fidelity(rep)[1]],
                   marker="*", s=200, color="k", label="written")
        ax.set(xlabel="kept FLOPs (share of the original)", ylabel=label,
               title="bisection: candidates explored")
        ax.legend()
    _save(plt, fig, path)


def write_tradeoff(path: str | os.PathLike[str], runs: Sequence[tuple[float, Report]]) -> None:
    """One point per ratio (fidelity against kept FLOPs) and the kept channels per group."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    label = fidelity(runs[0][1])[0]
    xs = [rep.after.flops / max(rep.before.flops, 1) for _, rep in runs]
    ys = [fidelity(rep)[1] for _, rep in runs]
    left.plot(xs, ys, "o-")
    for ratio, x, y in zip([r for r, _ in runs], xs, ys, strict=True):
        left.annotate(f"--ratio {ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    left.set(xlabel="kept FLOPs (share of the original)", ylabel=label,
             title="trade-off: one model per ratio")
    _groups(right, [(f"ratio {ratio:g}", rep.groups) for ratio, rep in runs])
    _save(plt, fig, path)


def _groups(ax, series: Sequence[tuple[str, list[dict]]]) -> None:
    """Group size as an outline, kept channels as bars (side by side for several runs)."""
    rows = series[0][1]
    ids = list(range(len(rows)))
    ax.bar(ids, [g["size"] for g in rows], color="none", edgecolor="grey", label="size")
    width = 0.8 / len(series)
    for i, (name, groups) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in ids], [g["kept"] for g in groups], width=width, label=name)
    ax.set(xlabel="channel group", ylabel="channels", title="kept channels per group")
    ax.set_xticks(ids, [str(g["id"]) for g in rows], fontsize=6)
    ax.legend()


def _save(plt, fig, path: str | os.PathLike[str]) -> None:
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path), dpi=110)
    except (OSError, ValueError) as exc:  # a bad extension or an unwritable place
        raise UsageError(f"cannot write --plot {path}: {exc}") from None
    finally:
        plt.close(fig)
