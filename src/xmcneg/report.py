"""Sweep report: run dirs -> convergence.png, diagnostics.png, summary.md, summary.csv, summary.json.

    python -m xmcneg.report SWEEP_DIR [MORE_DIRS ...] [--target P1] [--log-time] [--out DIR] [--group-by KEY]
                            [--peers PEERS.jsonl]

A run dir is a dir holding `.hydra/`, `results.json` or `metrics.csv` (found recursively, never inside another
run). Completed runs are grouped by sampler (+ --group-by config keys) and aggregated as mean ± std over seeds;
the others are listed with their reason. Runs of several settings (dataset and label count) get one report each
and a study.md. --peers adds the linear baselines of benchmarks/peers.py (a table, and reference lines in the plot).
"""
import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from xmcneg.data.formats import atomic_file
from xmcneg.records import atomic_write_text, read_metrics_csv, time_to_target, write_json

TEST_KEYS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")
RUN_KEYS = ("train_time_s", "samples_per_s", "peak_rss_mb")
DEFAULT_MARGIN = 0.01
PLOT_METRICS = ("val/P@1", "val/P@5")
DIAG_KEYS = ("diag/rank_pct", "diag/above_min_pos", "diag/pos_hit", "diag/grad_snr")


# ---------------------------------------------------------------------------------------------------- discovery
def find_run_dirs(roots):
    """Run dirs under each root (the root itself included), sorted, without duplicates; no descent into runs."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory")
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if (d / ".hydra").is_dir() or (d / "results.json").is_file() or (d / "metrics.csv").is_file():
                found.append(d)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    unique = {}
    for d in found:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------- reading
def _load_yaml(path):
    try:
        import yaml
        with open(path) as f:
            return yaml.safe_load(f)
    except Exception:  # noqa: BLE001 - a broken .hydra file must not stop the report
        return None


def select(cfg, dotted):
    """The value at the dotted key of a nested mapping (a dict or an OmegaConf config), or None."""
    for part in dotted.split("."):
        try:
            cfg = cfg.get(part)
        except Exception:  # noqa: BLE001  (None, not a mapping, or a value that does not resolve)
            return None
    return cfg


def _float(v):
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class Run:
    """One run dir: its results.json (if any), metrics.csv rows, config and overrides."""

    def __init__(self, run_dir):
        self.dir = Path(run_dir)
        self.results, self.results_error = None, None
        p = self.dir / "results.json"
        if p.is_file():
            try:
                self.results = json.loads(p.read_text())
                if not isinstance(self.results, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                self.results, self.results_error = None, f"unreadable results.json ({e})"
        try:
            self.rows = read_metrics_csv(self.dir / "metrics.csv")
        except (OSError, ValueError, csv.Error) as e:
            self.rows = []
            self.results_error = self.results_error or f"unreadable metrics.csv ({e})"
        self.config = _load_yaml(self.dir / ".hydra" / "config.yaml") or {}
        items = _load_yaml(self.dir / ".hydra" / "overrides.yaml") or []  # `key=value` (less a + / ~ prefix)
        self.overrides = {k.lstrip("+~"): v for k, v in (i.split("=", 1) for i in items
                                                          if isinstance(i, str) and "=" in i)}
        try:  # the diagnostics, logged through the CSV logger
            self.diag = [r for r in read_metrics_csv(self.dir / "csv" / "metrics.csv") if r.get(DIAG_KEYS[0]) != ""]
        except (OSError, ValueError, csv.Error):
            self.diag = []

    @property
    def setting(self):
        """'<dataset> C=<labels>': the runs of one race."""
        c = select(self.config, "dataset.num_labels") or self.get("num_labels")
        return f"{self.get('dataset.name') or self.get('dataset') or '?'}" + (f" C={c}" if c else "")

    def get(self, dotted):
        """A config value: results.json first (top-level keys), then .hydra/config.yaml, then overrides."""
        if self.results is not None and "." not in dotted and dotted in self.results:
            return self.results[dotted]
        v = select(self.config, dotted)
        return self.overrides[dotted] if (v is None or isinstance(v, dict)) and dotted in self.overrides else v

    @property
    def sampler(self):
        return str((self.results or {}).get("sampler") or select(self.config, "sampler.name")
                   or self.overrides.get("sampler", "unknown"))

    @property
    def seed(self):
        v = self.get("seed")
        return v if v is not None else ""

    @property
    def status(self):
        return "unfinished" if self.results is None else str(self.results.get("status", "unknown"))

    @property
    def completed(self):
        return self.status == "completed"

    @property
    def reason(self):
        if self.results_error:
            return self.results_error
        if self.results is None:
            n = len(self.rows)
            return f"no results.json (still running or killed; {n} validation row{'s' if n != 1 else ''} logged)"
        if self.results.get("reason"):
            return str(self.results["reason"])
        known = {"running": "status running: still running, or killed before it finished",
                 "interrupted": "interrupted before the planned end of training"}
        return known.get(self.status, f"status {self.status}")

    def curve(self, key):
        """(train_time_s, fractional epoch, value) arrays of the rows that have a numeric `key`."""
        epochs = [r.get("epoch") for r in self.rows]
        per_epoch, seen, points = Counter(epochs), Counter(), []
        for r, e in zip(self.rows, epochs):
            seen[e] += 1
            # validation at the end of epoch e (0-based) = e + 1 epochs done; several per epoch are spread evenly
            points.append((_float(r.get("train_time_s")), _float(e) + seen[e] / per_epoch[e], _float(r.get(key))))
        t, ep, v = np.asarray(points, dtype=float).reshape(-1, 3).T
        keep = ~(np.isnan(t) | np.isnan(v))
        return t[keep], ep[keep], v[keep]

    def final_val(self, key="val/P@1"):
        return next((v for v in (_float(r.get(key)) for r in reversed(self.rows)) if not math.isnan(v)), math.nan)

    def test(self, key):
        return _float(((self.results or {}).get("test") or {}).get(key))

    def value(self, key):
        return _float((self.results or {}).get(key))


def group_label(run, group_by=()):
    extra = [f"{key}={'?' if run.get(key) is None else run.get(key)}" for key in group_by if key != "sampler"]
    return run.sampler + (" " + ",".join(extra) if extra else "")


def read_peers(path):
    """The JSON lines of benchmarks/peers.py (one dict per line; blank lines skipped). A line that is not a JSON
    object with "dataset" and "library" raises ValueError("FILE:LINE: ...")."""
    lines = []
    with open(path) as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if not isinstance(line, dict) or "dataset" not in line or "library" not in line:
                raise ValueError(f"{path}:{n}: expected a JSON object with \"dataset\" and \"library\"")
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------------- aggregation
def mean_std(values):
    """(mean, sample std (0 for n=1), n) over the finite values."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def completed_groups(runs, group_by=()):
    """{group label: its completed runs}."""
    groups = {}
    for r in runs:
        if r.completed:
            groups.setdefault(group_label(r, group_by), []).append(r)
    return groups


def default_target(groups, margin=DEFAULT_MARGIN):
    """Best final val P@1 over groups (each the mean over its completed runs) minus `margin`; None if no data."""
    means = [mean_std([r.final_val("val/P@1") for r in runs]) for runs in groups.values()]
    means = [m for m, _, n in means if n]
    return max(means) - margin if means else None


def summarize(runs, target=None, group_by=()):
    """Aggregate completed runs per group. Time to target: a run's first metrics.csv row with val/P@1 >= target
    (`target`, else default_target); the speed-up vs uniform compares the times to reach uniform's final validation
    P@1 (mean over its runs). Returns (rows, target, target_source, first, failed_runs)."""
    groups = completed_groups(runs, group_by)
    failed_count = Counter(group_label(r, group_by) for r in runs if not r.completed)
    if target is None:
        target = default_target(groups)
        source = "best final validation P@1 (mean over seeds, best group) - 0.01"
    else:
        source = "--target"
    uni = mean_std([r.final_val("val/P@1") for r in groups.get("uniform", [])])[0]
    rows = []
    for g in sorted(set(groups) | set(failed_count)):
        grp = groups.get(g, [])
        row = {"group": g, "n": len(grp), "failed": failed_count.get(g, 0)}
        for k in TEST_KEYS:
            row[f"test_{k}"] = mean_std([r.test(k) for r in grp])
        for k in RUN_KEYS:
            row[k] = mean_std([r.value(k) for r in grp])
        row["final_val_P@1"] = mean_std([r.final_val("val/P@1") for r in grp])
        ttt = [time_to_target(r.rows, target) if target is not None else None for r in grp]
        row["time_to_target_s"] = mean_std([_float(x) for x in ttt])
        row["reached"] = sum(x is not None for x in ttt)
        row["epochs"] = mean_std([r.value("epochs") for r in grp])
        tu = [_float(time_to_target(r.rows, None if math.isnan(uni) else uni)) for r in grp]
        row["time_to_uniform_s"], row["reached_uniform"] = mean_std(tu), sum(not math.isnan(x) for x in tu)
        rows.append(row)
    base = [r["time_to_uniform_s"][0] for r in rows if r["group"] == "uniform"]
    for row in rows:
        row["speedup_vs_uniform"] = (base[0] / row["time_to_uniform_s"][0] if base else math.nan, 0.0, 1)
    # first: the group with the lowest mean time to target among those all of whose runs reach it (else some run)
    cands = [r for r in rows if r["reached"] > 0 and r["n"] > 0]
    full = [r for r in cands if r["reached"] == r["n"]]
    best = min(full or cands, key=lambda r: r["time_to_target_s"][0]) if cands else None
    first = None if best is None else {"group": best["group"], "time_s": best["time_to_target_s"][0],
                                       "reached": best["reached"], "n": best["n"], "all_seeds": bool(full)}
    return rows, target, source, first, [r for r in runs if not r.completed]


# ---------------------------------------------------------------------------------------------------- output
def _fmt(ms, digits=4):
    m, s, n = ms
    if n == 0 or math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + ("" if n == 1 else f" ± {s:.{digits}f}")


def _md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows):
    """Markdown table lines; cells are written as they are (escape them first)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, r)) + " |" for r in rows]


COLUMNS = [  # (row key = csv name, md header, digits)
    ("test_P@1", "test P@1", 4), ("test_P@3", "P@3", 4), ("test_P@5", "P@5", 4), ("test_nDCG@5", "nDCG@5", 4),
    ("test_PSP@5", "PSP@5", 4), ("final_val_P@1", "final val P@1", 4), ("train_time_s", "train time (s)", 1),
    ("samples_per_s", "samples/s", 0), ("peak_rss_mb", "peak RSS (MB)", 0),
    ("time_to_target_s", "time to target (s)", 1), ("epochs", "epochs", 1),
    ("time_to_uniform_s", "time to uniform's P@1 (s)", 1), ("speedup_vs_uniform", "speed-up vs uniform", 2),
]


def summary_csv(rows):
    header = ["group", "n", "failed"]
    for name, _, _ in COLUMNS:
        header += [f"{name}_mean", f"{name}_std"]
    header.insert(header.index("time_to_target_s_mean"), "reached_target")
    header.insert(header.index("time_to_uniform_s_mean"), "reached_uniform")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        out = [r["group"], r["n"], r["failed"]]
        for name, _, _ in COLUMNS:
            if name in ("time_to_target_s", "time_to_uniform_s"):
                out.append(r["reached" if name == "time_to_target_s" else "reached_uniform"])
            m, s, n = r[name]
            out += ["" if n == 0 else repr(round(m, 6)), "" if n == 0 else repr(round(s, 6))]
        w.writerow(out)
    return buf.getvalue()


PEER_COLUMNS = [("P@1", "test P@1", 4), ("P@3", "P@3", 4), ("P@5", "P@5", 4), ("nDCG@5", "nDCG@5", 4),
                ("PSP@5", "PSP@5", 4), ("train_s", "train time (s)", 1), ("predict_s", "predict time (s)", 1),
                ("peak_rss_mb", "peak RSS (MB)", 0)]


def peers_md(peers):
    """The '## Linear baselines' section of summary.md."""
    lines = ["## Linear baselines (benchmarks/peers.py)", ""]
    if not peers:
        return lines + ["No peer line for the datasets of this sweep.", ""]
    cells = []
    for p in peers:
        cells.append([_md_escape(p["dataset"]), _md_escape(p["library"]), _md_escape(p.get("version", "–"))])
        if p.get("status") == "failed":
            cells[-1] += [f"failed: {_md_escape(p.get('reason', ''))}"] + ["–"] * (len(PEER_COLUMNS) - 1)
        else:
            cells[-1] += [_fmt((_float(p.get(k)), 0.0, 1), d) for k, _, d in PEER_COLUMNS]
    return lines + _md_table(["dataset", "library", "version"] + [h for _, h, _ in PEER_COLUMNS], cells) + [""]


def summary_md(rows, target, source, first, failed, runs, out_dir, plot_name="convergence.png", peers=None):
    lines = ["# Sweep summary", "",
             f"{len(runs)} run dirs: {sum(r.completed for r in runs)} completed, {len(failed)} failed or "
             "unfinished. Values are mean ± std over the completed runs of each group (n); "
             "`failed` counts the group's other runs.", ""]
    if target is None:
        lines.append("Target P@1: none (no validation rows in any completed run).")
    else:
        lines.append(f"Target validation P@1: **{target:.4f}** ({source}).")
        if first is None:
            lines.append("No group reaches the target.")
        else:
            note = "" if first["all_seeds"] else \
                f" (no group reaches it in every run; {first['reached']}/{first['n']} runs of this one do)"
            lines.append(f"First to reach the target: **{first['group']}**, mean "
                         f"{first['time_s']:.1f} s of training{note}.")
    lines += ["", f"![convergence]({plot_name})", ""]
    hdr = ["group", "n", "failed"] + [h for _, h, _ in COLUMNS]
    hdr.insert(hdr.index("time to target (s)"), "reached")
    cells = []
    for r in rows:
        cells.append([_md_escape(r["group"]), r["n"], r["failed"]])
        for name, _, digits in COLUMNS:
            if name == "time_to_target_s":
                cells[-1].append(f"{r['reached']}/{r['n']}")
            cells[-1].append(_fmt(r[name], digits) + (f" ({r['reached_uniform']}/{r['n']})"
                                                     if name == "time_to_uniform_s" else ""))
    lines += _md_table(hdr, cells) + [""]
    if peers is not None:
        lines += peers_md(peers)
    lines += ["## Failed / unfinished runs", ""]
    lines += _md_table(["run dir", "sampler", "seed", "status", "reason"],
                       [[_md_escape(_rel(r.dir, out_dir)), _md_escape(r.sampler), r.seed, r.status,
                         _md_escape(r.reason)] for r in failed]) if failed else ["None."]
    lines += ["", "## Runs", ""]
    lines += _md_table(["run dir", "sampler", "seed", "status", "test P@1", "train time (s)", "val rows"],
                       [[_md_escape(_rel(r.dir, out_dir)), _md_escape(r.sampler), r.seed, r.status,
                         _fmt((r.test("P@1"), 0.0, 1), 4), _fmt((r.value("train_time_s"), 0.0, 1), 1), len(r.rows)]
                        for r in runs])
    return "\n".join(lines + [""])


def _rel(path, base):
    try:
        return os.path.relpath(Path(path).resolve(), Path(base).resolve())
    except ValueError:
        return str(path)


def _band(curves, log_x=False, n_grid=200):
    """curves: list of (x, y). Returns grid, mean, min, max over the x range that every curve covers (if the
    curves do not overlap: over their union, each point averaging the curves that cover it)."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves]
    curves = [(x[ok], y[ok]) for x, y in curves for ok in [~(np.isnan(x) | np.isnan(y))]]
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    lo = max(float(x.min()) for x, _ in curves)
    hi = min(float(x.max()) for x, _ in curves)
    if hi < lo:
        lo = min(float(x.min()) for x, _ in curves)
        hi = max(float(x.max()) for x, _ in curves)
    if log_x:
        if lo <= 0:  # a log axis starts at the first positive time
            pos = [float(x[x > 0].min()) for x, _ in curves if (x > 0).any()]
            lo = min(pos) if pos else 1e-3
        hi = max(hi, lo * 1.0001)
        grid = np.geomspace(lo, hi, n_grid)
    else:
        grid = np.linspace(lo, hi, n_grid) if hi > lo else np.array([lo])
    # the points themselves too, so single-point and step-like curves keep their values
    grid = np.unique(np.concatenate([grid] + [x[(x >= lo) & (x <= hi)] for x, _ in curves]))
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        inside = (grid >= x[0]) & (grid <= x[-1])
        ys[i, inside] = np.interp(grid[inside], x, y)
    keep = ~np.all(np.isnan(ys), axis=0)
    grid, ys = grid[keep], ys[:, keep]
    return grid, np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


PEER_STYLES = ((0, (6, 2)), (0, (2, 2)), (0, (6, 2, 2, 2)), (0, (1, 1)))


def draw_peers(ax, peers, key):
    """Each peer's test `key` (P@1 / P@5) as a horizontal line, one style per library (one legend entry each),
    annotated at the right edge with the library (and the dataset when there are several) and the value."""
    libraries = sorted({p["library"] for p in peers})
    several = len({p["dataset"] for p in peers}) > 1
    seen = set()
    for peer in peers:
        y = _float(peer.get(key))
        if math.isnan(y):
            continue
        lib = peer["library"]
        ax.axhline(y, color="black", linewidth=0.9, linestyle=PEER_STYLES[libraries.index(lib) % len(PEER_STYLES)],
                   label="_nolegend_" if lib in seen else f"{lib} (test)")
        seen.add(lib)
        text = f"{lib} ({peer['dataset']}) {y:.3f}" if several else f"{lib} {y:.3f}"
        ax.annotate(text, (1.0, y), xycoords=ax.get_yaxis_transform(), xytext=(-2, 1),
                    textcoords="offset points", ha="right", va="bottom", fontsize="x-small")


def _draw_group(ax, curves, color, label, log_x=False):
    """One group's runs `curves` [(x, y)] on `ax`: each run's points, faint, and the mean with its min-max band."""
    band = _band(curves, log_x=log_x)
    if band is None:
        return
    x, mean, mn, mx = band
    for cx, cy in curves:
        ax.plot(cx, cy, ".", color=color, alpha=0.35, markersize=4)
    if len(x) == 1:
        ax.errorbar(x, mean, yerr=[mean - mn, mx - mean], fmt="o", color=color, label=label)
    else:
        ax.plot(x, mean, color=color, label=label)
        ax.fill_between(x, mn, mx, color=color, alpha=0.2, linewidth=0)


def _figure(figsize):
    """(pyplot, figure, 2x2 axes), drawn off-screen."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return (plt, *plt.subplots(2, 2, figsize=figsize, squeeze=False))


def _save(plt, fig, path, dpi):
    """Write the figure to `path` atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)


def plot_convergence(groups, path, log_time=False, target=None, peers=()):
    plt, fig, axes = _figure((12, 8.5))
    for gi, (g, runs) in enumerate(sorted(groups.items())):
        for mi, metric in enumerate(PLOT_METRICS):
            curves = [r.curve(metric) for r in runs]
            for xi, log_x in ((0, log_time), (1, False)):
                _draw_group(axes[mi][xi], [(c[xi], c[2]) for c in curves], f"C{gi % 10}", f"{g} (n={len(runs)})",
                            log_x)
    for mi, metric in enumerate(PLOT_METRICS):
        for xi, xlabel in enumerate(("train time (s)", "epoch")):
            ax = axes[mi][xi]
            ax.set_xlabel(xlabel + (" [log]" if xi == 0 and log_time else ""))
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {xlabel.split(' (')[0]}")
            ax.grid(True, alpha=0.3)
            if xi == 0 and log_time:
                ax.set_xscale("log")
            if target is not None and metric == "val/P@1":
                ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
            draw_peers(ax, peers, metric.split("/", 1)[1])
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(loc="lower right", fontsize="small")
    else:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no validation rows in completed runs", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    fig.suptitle("Validation metrics: mean over seeds, min–max band (dots: each run's validations)")
    _save(plt, fig, path, dpi=110)


def plot_diagnostics(groups, path):
    """diagnostics.png: DIAG_KEYS against train time, per group the mean over seeds with a min-max band."""
    plt, fig, axes = _figure((10, 7))
    for gi, (g, runs) in enumerate(sorted(groups.items())):
        for ax, key in zip(axes.flat, DIAG_KEYS):
            curves = [([_float(d.get("train_time_s")) for d in r.diag], [_float(d.get(key)) for d in r.diag])
                      for r in runs if r.diag]
            _draw_group(ax, curves, f"C{gi % 10}", f"{g} (n={len(runs)})")
    for ax, key in zip(axes.flat, DIAG_KEYS):
        ax.set(xlabel="train time (s)", ylabel=key, title=key)
        ax.grid(True, alpha=0.3)
        if key == "diag/grad_snr":
            ax.set_yscale("symlog", linthresh=1e-2)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Negative diagnostics on a fixed probe batch (mean over seeds, min-max band)")
    _save(plt, fig, path, dpi=80)


def make_study(runs, out_dir, **kw):
    """One report per setting (Run.setting) in out_dir/<setting>/, and out_dir/study.md with their tables."""
    lines = ["# Study", ""]
    for setting in sorted({r.setting for r in runs}):
        sub = out_dir / setting.replace(" ", "_").replace("=", "")
        res = make_report([], out=sub, runs=[r for r in runs if r.setting == setting], **kw)
        table = [ln for ln in res["md"].read_text().splitlines() if ln.startswith("|")]
        lines += [f"## {setting}", "", f"[{sub.name}/summary.md]({sub.name}/summary.md)", "",
                  table[0], table[1]] + [ln for ln in table[2:] if ln.count("|") == table[0].count("|")] + [""]
        lines += [f"![convergence]({sub.name}/convergence.png)", ""]
    atomic_write_text(out_dir / "study.md", "\n".join(lines))
    return {"md": out_dir / "study.md", "runs": runs}


def make_report(dirs, out=None, target=None, log_time=False, group_by=(), peers=None, runs=None):
    """Read every run under `dirs`, write convergence.png, summary.md, summary.csv (+ summary.json) into `out`
    (default: the first dir). `peers`: the lines of benchmarks/peers.py (see read_peers) to add, or None.
    Returns a dict with the paths and the summary."""
    dirs = [Path(d) for d in dirs]
    if runs is None:
        run_dirs = find_run_dirs(dirs)
        if not run_dirs:
            raise FileNotFoundError("no run dirs (with .hydra/, results.json or metrics.csv) under "
                                    + ", ".join(map(str, dirs)))
        runs = [Run(d) for d in run_dirs]
    out_dir = Path(out) if out is not None else dirs[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    if len({r.setting for r in runs} - {"?"}) > 1:  # runs that name no dataset do not make a setting
        return make_study(runs, out_dir, target=target, log_time=log_time, group_by=group_by, peers=peers)
    rows, target, source, first, failed = summarize(runs, target=target, group_by=group_by)
    groups = completed_groups(runs, group_by)
    datasets = {str(r.results["dataset"]) for r in runs if r.completed and r.results.get("dataset")}
    if peers is not None and datasets:  # the peer lines of the completed runs' datasets (all if none names one)
        peers = [p for p in peers if str(p["dataset"]) in datasets]
    png, md, csv_path = out_dir / "convergence.png", out_dir / "summary.md", out_dir / "summary.csv"
    plot_convergence(groups, png, log_time=log_time, target=target, peers=peers or ())
    if any(r.diag for g in groups.values() for r in g):
        plot_diagnostics(groups, out_dir / "diagnostics.png")
    atomic_write_text(md, summary_md(rows, target, source, first, failed, runs, out_dir, png.name, peers=peers))
    atomic_write_text(csv_path, summary_csv(rows))
    write_json(out_dir / "summary.json", {
        "target_p1": target, "target_source": source, "first_to_target": first,
        "groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
        "failed": [{"dir": str(r.dir), "sampler": r.sampler, "seed": r.seed, "status": r.status,
                    "reason": r.reason} for r in failed],
        "peers": peers,
    })
    return {"png": png, "md": md, "csv": csv_path, "rows": rows, "target": target, "first": first,
            "failed": failed, "runs": runs, "peers": peers}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m xmcneg.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR", help="sweep dirs or run dirs (searched recursively)")
    p.add_argument("--target", type=float, default=None,
                   help="validation P@1 target for time-to-target (default: best final val P@1 - 0.01)")
    p.add_argument("--log-time", action="store_true", help="log scale for the train-time axis")
    p.add_argument("--out", default=None, help="output dir (default: the first SWEEP_DIR)")
    p.add_argument("--group-by", action="append", default=[], metavar="KEY",
                   help="also group by this dotted config key, e.g. sampler.num_negatives (repeatable)")
    p.add_argument("--peers", default=None, metavar="PEERS.jsonl",
                   help="JSON lines of benchmarks/peers.py: a table in summary.md, reference lines in the plot")
    a = p.parse_args(argv)
    if a.target is not None and not (0.0 <= a.target <= 1.0):
        print(f"error: --target {a.target}: a P@1 value in [0, 1]", file=sys.stderr)
        return 2
    try:
        peers = read_peers(a.peers) if a.peers is not None else None
    except (OSError, ValueError) as e:
        print(f"error: {e}" if isinstance(e, ValueError) else f"error: {a.peers}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        res = make_report(a.dirs, out=a.out, target=a.target, log_time=a.log_time, group_by=a.group_by,
                          peers=peers)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ok = sum(r.completed for r in res["runs"])
    if "rows" not in res:  # several settings: one report each
        print(f"{len(res['runs'])} runs ({n_ok} completed) in {len({r.setting for r in res['runs']})} settings; "
              f"wrote {res['md']}")
        return 0
    print(f"{len(res['runs'])} runs ({n_ok} completed, {len(res['failed'])} failed/unfinished)")
    if res["target"] is not None:
        f = res["first"]
        print(f"target val P@1 {res['target']:.4f}: " + (f"first reached by {f['group']} ({f['time_s']:.1f} s)"
                                                         if f else "not reached"))
    for r in res["failed"]:
        print(f"  not completed: {r.dir} [{r.status}] {r.reason}")
    if res["peers"] is not None:
        print(f"{len(res['peers'])} peer lines for the datasets of these runs")
    for k in ("md", "csv", "png"):
        print(f"wrote {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
