"""The demo report as people read it: the terminal table, report.md and the training-curve plot."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from kd.pipeline.demo.report import CAPABILITIES, METRICS, PLOT_FILE, pct


def _cell(model: Mapping[str, Any], metric: str) -> str:
    mean, sd = model["mean"][metric], model["std"][metric]
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


SHORT_LABELS = {"majority": "majority answer (no image)", "teacher_untrained": "teacher, untrained init",
                "teacher": "teacher, trained (all 3 roles)", "sft": "student SFT (CE only)",
                "logits": "student CE + logit KD", "hidden": "student CE + hidden", "attention": "student CE + attention",
                "kd": "student KD (all signals)"}


def format_table(doc: Mapping[str, Any]) -> str:
    """The results as a plain-text table of at most 80 columns (what ``kd demo`` prints)."""
    head = f"{'test accuracy, %':<32}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [(f"{doc['mode']} mode, {sum(doc['test_counts'].values())} held-out test records; students: mean +- std "
              f"over {doc['n_seeds']} seed(s)"), head, "-" * len(head)]
    for key, mdl in doc["models"].items():
        label = SHORT_LABELS.get(key, mdl["label"])[:32]
        lines.append(f"{label:<32}" + "".join(f"{_cell(mdl, m).replace(' ± ', '+-'):>12}" for m in METRICS))
    lines.append("")
    lines.extend(doc["conclusion"])
    r, tm = doc["reuse"], doc["timings"]
    lines.append(f"reuse: teacher {'reused' if r['teacher'] else 'trained'}, caches "
                 f"{'all reused' if all(r['caches'].values()) else 'built'}"
                 f"{' (no teacher ran in this run)' if r['no_teacher_ran'] else ''}; timings: teacher "
                 f"{tm['teacher']:.0f}s, caches {tm['caches']:.0f}s, students {tm['students']:.0f}s, "
                 f"total {tm.get('total', 0):.0f}s")
    return "\n".join(lines)


def _md_table(doc: Mapping[str, Any]) -> list[str]:
    lines = ["| model | perception | reasoning | planning | average | seeds |", "|---|---|---|---|---|---|"]
    for mdl in doc["models"].values():
        lines.append(f"| {mdl['label']} | " + " | ".join(_cell(mdl, m) for m in METRICS) + f" | {mdl['n_seeds']} |")
    return lines


def _md_ablation(doc: Mapping[str, Any]) -> list[str]:
    L = ["## Which signals helped (ablation, paired with SFT per seed)", "",
         ("| variant | loss weights (ce, kd, hidden, attention) | average | Δ vs SFT (mean ± std) | seeds ahead | "
          "Δ perception | Δ reasoning | Δ planning | verdict |"),
         "|---|---|---|---|---|---|---|---|---|"]
    for a in doc["ablation"]:
        dd, lw = a["delta_vs_sft"], a["loss"]
        sd = dd["std"]["average"]
        spread = f" ± {100 * sd:.1f}" if sd is not None else ""
        caps = " | ".join(f"{100 * dd['mean'][c]:+.1f}" for c in CAPABILITIES)
        L.append(f"| {a['label']} | {lw['ce']:g}, {lw['kd']:g}, {lw['hidden']:g}, {lw['attention']:g} "
                 f"| {pct(a['mean']['average'])} | {100 * dd['mean']['average']:+.1f}{spread} "
                 f"| {dd['wins']['average']}/{len(dd['seeds'])} | {caps} | {a['verdict']['average']} |")
    L += ["", ("A verdict says *helped* / *hurt* only when every seed agrees and the mean clears the test-set "
               "standard error; otherwise *unclear*."), ""]
    return L


def _md_timings(doc: Mapping[str, Any]) -> list[str]:
    r, tm = doc["reuse"], doc["timings"]
    teacher_state = "yes (no teacher ran)" if r["teacher"] else "no"
    L = ["## Reuse and timings", "",
         "| stage | this run (s) | reused | when built (s) |", "|---|---|---|---|",
         f"| data (synthesize + split) | {tm['data']:.1f} | {'yes' if r['data'] else 'no'} | |",
         (f"| teacher training (+ its test eval) | {tm['teacher']:.1f} | {teacher_state} "
          f"| {tm['teacher_original_train_seconds']:.1f} (training) |")]
    for role, c in doc["caches"].items():
        state = "yes (no teacher ran)" if c["reused"] else "no"
        L.append(f"| cache {role} | {0.0 if c['reused'] else c['seconds']:.1f} | {state} "
                 f"| {'' if c['reused'] else c['seconds']} |")
    L += [f"| all caches (build or reuse + verify) | {tm['caches']:.1f} | | |",
          (f"| students ({len(doc['seeds'])} seed(s) x {len(doc['plan']['variants'])} variants, {tm['workers']} "
           f"process(es)) | {tm['students']:.1f} | no: trained again from the caches | |"),
          f"| total | {tm.get('total', 0):.1f} | | |", ""]
    built = [role for role, reused in r["caches"].items() if not reused]
    if r["no_teacher_ran"]:
        L.append("This run ran no teacher at all: the trained teacher checkpoint and every cache were reused.")
    else:
        teacher = "reused the trained teacher" if r["teacher"] else "trained (or re-scored) the teacher"
        caches = "built the caches of " + ", ".join(built) if built else "reused every cache"
        L.append(f"This run {teacher} and {caches}.")
    return L


def render_markdown(doc: Mapping[str, Any]) -> str:
    d = doc["design"]
    L = [f"# kd demo report ({doc['mode']} mode)", ""]
    L += [f"- {line}" for line in doc["conclusion"]]
    L += ["", f"Seeds: {doc['seeds']} ({doc['seeds_note']}).", "", "## Experiment design", ""]
    L += [f"- **{k}**: {d[k]}" for k in ("task", "teacher", "student", "why", "training", "loss", "test")]
    signals = "; ".join(f"{role}: {', '.join(f'{k}={v}' for k, v in s.items())}" for role, s in d["signals"].items())
    L.append(f"- **signals cached per role** (all from the one trained teacher, hf engine): {signals}")
    L += ["", "## Results (test split, greedy exact match, %)", "",
          "Mean ± sample std over seeds for students; teacher and baselines are single runs.", ""]
    L += _md_table(doc)
    L += ["", (f"Test records per capability: {doc['test_counts']}; binomial standard error of one model's average "
               f"≈ {100 * doc['test_standard_error_average']:.1f} points."), ""]
    if doc["ablation"]:
        L += _md_ablation(doc)
    L += ["## Training curves", "", f"![training curves]({doc['files']['plot']})", "",
          ("Teacher: CE loss and validation average; students: answer CE (the same scale for every variant; KD runs "
           "also minimise their KD terms) and validation average, mean over seeds (bands: min-max)."), ""]
    L += _md_timings(doc)
    L += ["", "## Caches", "", "| role | signals | samples | tokens | bytes/token | key | path |",
          "|---|---|---|---|---|---|---|"]
    for role, c in doc["caches"].items():
        sig = ", ".join(f"{k}={v}" for k, v in c["signals"].items())
        L.append(f"| {role} | top-k logits, {sig} | {c['samples']} | {c['tokens']} | {c['bytes_per_token']} | "
                 f"`{c['key'][:16]}` | `{c['path']}` |")
    ratio = doc["data"]["scenes"]["teacher_train"] / max(1, doc["data"]["scenes"]["student_train"])
    L += ["", "## Caveats", "",
          ("- Tiny models on synthetic data: this shows the pipeline working and the direction of effects under this "
           "design, not Drive-KD's numbers."),
          (f"- Part of any KD gain is information the student's data lacks: the teacher was trained on {ratio:.1f}x "
           f"as many scenes, with clean answers, while {doc['plan']['label_noise']:.0%} of the student's answers are "
           "wrong."),
          ("- One trained teacher checkpoint serves all three roles; its three caches differ only in the extra signals "
           "(the logit KD term therefore sees the same distribution three times, weighted 0.8/0.1/0.1)."),
          f"- {doc['seeds_note']}.", ""]
    return "\n".join(L)


COLOURS = {"majority": "#bbbbbb", "teacher_untrained": "#8c564b", "teacher": "black", "sft": "tab:gray",
           "logits": "tab:blue", "hidden": "tab:purple", "attention": "tab:orange", "kd": "tab:green"}


def plot_curves(doc: Mapping[str, Any], path: Path) -> None:
    """Teacher loss / val accuracy, student train CE and val accuracy over steps, and test accuracy bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = doc["curves"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    tr, tv = c["teacher"]["train"], c["teacher"]["val"]
    if tr:
        ax.plot([p[0] for p in tr], [p[1] for p in tr], color="black", label="train answer CE")
    ax.set(title="teacher training" + (" (reused checkpoint: curve of the run that trained it)"
                                       if doc["reuse"]["teacher"] else ""), xlabel="step", ylabel="answer CE",
           yscale="log")
    ax2 = ax.twinx()
    if tv:
        ax2.plot([p[0] for p in tv], [p[1] for p in tv], "o-", color="tab:red", label="val average accuracy")
    ax2.set_ylabel("val average accuracy", color="tab:red")
    ax2.set_ylim(0, 1)
    for key, ax, ylabel in (("train_ce", axes[0][1], "train answer CE"),
                            ("val_average", axes[1][0], "val average accuracy")):
        for v, s in c["students"].items():
            pts = s[key]
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], label=doc["models"][v]["label"], color=COLOURS.get(v))
            ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=COLOURS.get(v), alpha=0.15)
        ax.set(xlabel="step", ylabel=ylabel, title=f"students: {ylabel} (mean over {doc['n_seeds']} seed(s))")
        if key == "train_ce":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
            base = doc["models"]["majority"]["mean"]["average"]
            ax.axhline(base, color=COLOURS["majority"], ls="--", lw=1, label="majority answer (no image), test")
        ax.legend(fontsize=7, loc="upper right" if key == "train_ce" else "upper left")
    ax = axes[1][1]
    names = list(doc["models"])
    width = 0.8 / max(1, len(names))
    for i, k in enumerate(names):
        mdl = doc["models"][k]
        ax.bar([j + i * width for j in range(len(METRICS))], [mdl["mean"][m] for m in METRICS], width,
               yerr=[mdl["std"][m] or 0.0 for m in METRICS], label=mdl["label"], color=COLOURS.get(k), capsize=2)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(METRICS))], METRICS)
    ax.set(ylim=(0, 1), title="test accuracy (error bars: std over seeds)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"kd demo ({doc['mode']} mode)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_report(work: Path, doc: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plot into ``work``; return their paths."""
    work = Path(work)
    paths = {"json": work / "report.json", "markdown": work / "report.md", "plot": work / PLOT_FILE}
    plot_curves(doc, paths["plot"])
    for key, text in (("json", json.dumps(doc, indent=1, allow_nan=False) + "\n"), ("markdown", render_markdown(doc))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(paths[key])
    return paths
