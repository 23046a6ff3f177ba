"""`ponder report RUN_DIR`: one self-contained HTML page that shows how a GRPO run went.

Curves over steps from metrics.jsonl (PNG images drawn by matplotlib's Agg renderer, embedded as base64),
completions from early and late in the run side by side (samples.jsonl) with think and answer set apart,
the before/after evaluation table (eval_before.json, eval_after.json) and the resolved config.yaml.
A series the run did not log, or that is 0 throughout (no KL term, nothing clipped), gets no plot.
Guardrail firings (`guardrail_events` in metrics.jsonl, ponder.rl.guardrails) are marked on every curve
and listed with what was done.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from itertools import zip_longest
from pathlib import Path

from ponder.errors import UserError
from ponder.files import check_writable, write_atomic
from ponder.metrics import read_jsonl

# title, series (a key, or a prefix ending in "/" for every key under it), stacked
PANELS = [
    ("reward (total and per reward function)", ["reward", "reward/"], False),
    ("accuracy and format rate", ["accuracy", "format_rate"], False),
    ("completion length (tokens)", ["completion_len/mean", "completion_len/max"], False),
    ("truncated, repeating and unreasoned completions (share)", ["truncated_frac", "repeated_line_frac", "unreasoned_frac"], False),
    ("reflection-word rate", ["reflection_rate"], False),
    # each task's (and language's) own curves, where a run mixes them
    ("accuracy per task", ["accuracy/"], False),
    ("completion length per task (tokens)", ["completion_len/"], False),
    ("reflection-word rate per task", ["reflection_rate/"], False),
    ("language mixing rate", ["mixing_rate", "mixing_rate/"], False),
    ("KL to the reference", ["kl"], False),
    ("entropy (nats per token)", ["entropy"], False),
    ("clipped token share", ["clip_low_frac", "clip_high_frac", "clip_dual_frac"], False),
    ("zero-variance groups (no signal)", ["zero_var_groups_frac"], False),
    ("seconds per step", ["time/generate", "time/reward", "time/train"], True),
    ("training loss", ["loss"], False),
    ("gradient norm (before clipping)", ["grad_norm"], False),
    ("learning rate", ["lr"], False),
    ("tokens per second", ["tokens_per_s"], False),
]
COUNTS = {"problems", "scored_problems", "k"}  # evaluation figures that are sizes, not results
ACCURACY_RE = re.compile(r"(pass|cons)@|greedy$|mean_score$")  # evaluation figures of being right
LINESTYLES = ["-", "--", "-.", ":"]  # curves that coincide (reward and its only reward function) stay visible
SAMPLES_SHOWN = 3  # completions per side
PART_RE = re.compile(r"(<think>.*?(?:</think>|$)|<answer>.*?(?:</answer>|$))", re.DOTALL)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write report.html (curves, completions, before/after) for a run",
                       description="Write a self-contained HTML report of a run directory: curves of reward, "
                       "accuracy, length, reflection rate, KL, entropy, timing and evaluations over steps, early "
                       "and late completions side by side, the before/after evaluation table and the config.")
    p.add_argument("run_dir", help="run directory (runs/<name>/, holding metrics.jsonl)")
    p.add_argument("--out", help="where to write the HTML, a file or a directory (default: RUN_DIR/report.html)")
    p.set_defaults(func=lambda args: print(write_report(args.run_dir, args.out)))


def write_report(run_dir, out=None) -> Path:
    """Write the report of `run_dir` (to RUN_DIR/report.html unless `out` is given) and return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}; is it a run directory?")
    path = Path(out) if out else run_dir / "report.html"
    if path.is_dir():  # --out DIR: the report goes in it
        path = path / "report.html"
    # the report takes the name by a rename: a run's metrics.jsonl or weights, or a device node, would be replaced
    if path.exists() and not _is_report(path):
        raise UserError(f"--out '{path}' exists and is not a report ponder wrote (it would be replaced); choose a new "
                        "file, or an earlier report to write over")
    check_writable(path.parent, "--out")  # before the plots are drawn
    # a row without a step to plot it at (a hand-edited or damaged line) is left out, as a half-written line is
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if _number(r.get("step"))]
    before, after = _load_json(run_dir / "eval_before.json"), _load_json(run_dir / "eval_after.json")
    data = series(rows, before)
    events = guardrail_events(rows)
    config = run_dir / "config.yaml"
    name = run_dir.resolve().name
    body = [f"<h1>ponder run: {_esc(name)}</h1>", _summary(rows, data)]
    if events:
        body.append(_events_table(events))
    plots, always_zero = _plots(data, events)
    body.append("<h2>Curves</h2>" + ("".join(plots) if plots else "<p>No steps logged yet.</p>"))
    if always_zero:
        body.append(f"<p class='note'>0 at every step, not plotted: {_esc('; '.join(always_zero))}</p>")
    if before or after:
        body.append("<h2>Held-out evaluation: before / after training</h2>" + _before_after(before or {}, after or {}))
    body.append(_samples(read_jsonl(run_dir / "samples.jsonl")))
    if config.is_file():
        body.append(f"<h2>Config</h2><pre class='config'>{_esc(config.read_text(encoding='utf-8', errors='replace'))}</pre>")
    page = f"{PAGE_START}{_esc(name)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, page)  # a reader never sees half a report
    return path


def series(rows: list[dict], before: dict | None = None) -> dict[str, tuple[list, list]]:
    """key -> (steps, values) for every numeric key; nulls (NaN) and values past PLOT_MAX left out, the last value of a
    step kept.
    Figures of eval_before.json join the eval/<task>/<figure> series at step 0."""
    points: dict[str, dict] = {}
    start = [{"step": 0, **{f"eval/{t}/{k}": v for t, r in (before or {}).items() for k, v in _figures(r).items()}}]
    for row in start + rows:
        for key, value in row.items():
            # (past PLOT_MAX matplotlib cannot lay out the axis: 1e308 in a blown-up run's figures was a traceback)
            if key not in ("step", "time") and _number(value) and abs(value) <= PLOT_MAX:
                points.setdefault(key, {})[row["step"]] = float(value)
    return {k: (sorted(p), [p[s] for s in sorted(p)]) for k, p in points.items()}


def guardrail_events(rows: list[dict]) -> list[dict]:
    """Every guardrail firing the run logged, in step order (a resumed run's rows are already deduplicated)."""
    return [e for r in rows if isinstance(r.get("guardrail_events"), list)  # (a hand-edited 5 was a traceback)
            for e in r["guardrail_events"] if isinstance(e, dict)]


def _events_table(events: list[dict]) -> str:
    head = "<tr><th>step</th><th>guardrail</th><th>figure</th><th>value</th><th>threshold</th><th>action</th><th>what happened</th></tr>"
    cells = []
    for e in events:
        example = f"<pre class='other'>{_esc(str(e['example']))}</pre>" if e.get("example") else ""
        cells.append(f"<tr><td>{_esc(str(e.get('step')))}</td><td>{_esc(str(e.get('guardrail')))}</td><td>{_esc(str(e.get('figure')))}</td>"
                     f"<td>{_fmt(e.get('value'))}</td><td>{_esc(str(e.get('op', '')))} {_fmt(e.get('threshold'))}</td>"
                     f"<td>{_esc(str(e.get('action')))}</td><td class='event'>{_esc(str(e.get('message')))}{example}</td></tr>")
    return (f"<h2>Guardrails fired ({len(events)})</h2><p class='note'>Marked on every curve below as dotted red lines.</p>"
            f"<table class='events'>{head}{''.join(cells)}</table>")


def _plots(data: dict, events: list[dict] = ()) -> tuple[list[str], list[str]]:
    """The <img> of every panel with data, and the panels left out for being 0 throughout."""
    named = {pat for _, pats, _ in PANELS for pat in pats if not pat.endswith("/")}  # a prefix takes the rest
    panels = [(title, [k for pat in pats for k in data
                       if k == pat or (pat.endswith("/") and k.startswith(pat) and k not in named)], stacked)
              for title, pats, stacked in PANELS]
    evals: dict[str, list[str]] = {}  # eval/<task>/<figure>; task names may hold "/" (arithmetic/test)
    for key in data:
        if key.startswith("eval/") and key.count("/") >= 2 and key.rsplit("/", 1)[1] not in COUNTS:
            evals.setdefault(key[5:].rsplit("/", 1)[0], []).append(key)
    for task, keys in evals.items():
        right = [k for k in keys if ACCURACY_RE.match(k.rsplit("/", 1)[1])]
        rates = [k for k in keys if k not in right and all(0 <= v <= 1 for v in data[k][1])]
        panels.append((f"held-out {task}: accuracy", right, False))
        panels.append((f"held-out {task}: rates", rates, False))
        panels.append((f"held-out {task}: other figures", [k for k in keys if k not in right + rates], False))
    # a panel whose every series is 0 throughout (no KL term, nothing clipped) is left out, with a note
    panels = [(t, {k: data[k] for k in keys}, st) for t, keys, st in panels if keys]
    zero = [not any(v for _, ys in curves.values() for v in ys) for _, curves, _ in panels]
    marks = sorted({e["step"] for e in events if _number(e.get("step"))})
    return ([_plot(*p, marks=marks) for p, z in zip(panels, zero) if not z],
            [f"{t} ({', '.join(curves)})" for (t, curves, _), z in zip(panels, zero) if z])


def _plot(title: str, curves: dict[str, tuple[list, list]], stacked: bool, marks: list = ()) -> str:
    from matplotlib.figure import Figure  # no pyplot: no global state, rendered by Agg on savefig

    fig = Figure(figsize=(5.2, 3.2), dpi=100)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.91, bottom=0.14)  # fixed margins: a layout engine doubles the drawing time
    ax = fig.add_subplot()
    ax.locator_params(nbins=4)  # a few ticks: each is three artists to make and lay out, most of a panel's drawing time
    if stacked:  # parts of one whole: the stack's height is the step's time
        steps = sorted({s for xs, _ in curves.values() for s in xs})
        parts = [[dict(zip(*c)).get(s, 0.0) for s in steps] for c in curves.values()]
        if len(steps) > 1:
            ax.stackplot(steps, parts, labels=list(curves), alpha=0.8)
        else:  # one step: a stack of areas has no width
            bottom = 0.0
            for label, (value,) in zip(curves, parts):
                ax.bar(steps, [value], bottom=bottom, label=label, alpha=0.8, width=0.6)
                bottom += value
    else:
        for i, (key, (xs, ys)) in enumerate(curves.items()):
            key = key.rsplit("/", 1)[1] if key.startswith("eval/") else key  # the panel's title names the task
            if len(xs) >= 30:  # noisy per-step figures: the raw curve faint, a running mean over it
                ax.plot(xs, ys, color=f"C{i}", alpha=0.25, linewidth=0.8)
                ax.plot(xs, _running_mean(ys, max(3, len(ys) // 20)), color=f"C{i}", linestyle=LINESTYLES[i % 4], label=f"{key} (running mean)")
            else:  # few points (evaluations): each one marked
                ax.plot(xs, ys, color=f"C{i}", linestyle=LINESTYLES[i % 4], label=key, marker="o" if len(xs) <= 12 else None, markersize=3)
    for i, step in enumerate(marks):  # guardrail firings
        ax.axvline(step, color="red", linestyle=":", linewidth=1.2, alpha=0.8, label="guardrail fired" if i == 0 else None)
    ax.set_title(title, fontsize=10, y=1.0)  # placed, not searched for: the search measured every tick label first
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f"<img alt='{_esc(title)}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _running_mean(ys: list[float], window: int) -> list[float]:
    """Mean of the last `window` values (fewer at the start), so the curve lags but never looks ahead."""
    sums = [0.0]
    for y in ys:
        sums.append(sums[-1] + y)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(ys))]


def _summary(rows: list[dict], data: dict) -> str:
    train = [r for r in rows if not all(k.startswith("eval/") for k in r if k not in ("step", "time"))]
    if not train:
        return "<p>No training step logged.</p>"
    times = [r["time"] for r in rows if _number(r.get("time"))]
    parts = [f"{len(train)} steps (last: {train[-1]['step']})"]
    if len(times) > 1:
        parts.append(f"{(max(times) - min(times)) / 60:.1f} min from first to last log line")
    for key in ("reward", "accuracy", "format_rate", "completion_len/mean", "reflection_rate"):
        if key in data:
            ys = data[key][1]
            parts.append(f"{key} {_fmt(ys[0])} &rarr; {_fmt(ys[-1])}")
    return "<p class='summary'>" + " &middot; ".join(parts) + "</p>"


def _before_after(before: dict, after: dict) -> str:
    out = []
    for task in dict.fromkeys([*before, *after]):
        b, a = _figures(before.get(task)), _figures(after.get(task))
        head = f"<tr><th>{_esc(task)}</th><th>before</th><th>after</th><th>change</th></tr>"
        cells = [f"<tr><td>{_esc(k)}</td><td>{_fmt(b.get(k))}</td><td>{_fmt(a.get(k))}</td>"
                 f"<td>{_fmt(a[k] - b[k], sign=True) if k in a and k in b else '-'}</td></tr>"
                 for k in dict.fromkeys([*b, *a]) if k not in COUNTS]
        out.append(f"<table>{head}{''.join(cells)}</table>")
    return "".join(out)


def _figures(result) -> dict:
    """Scalar figures of one evaluation result: under "metrics" (ponder.evaluate) or at its top level."""
    if not isinstance(result, dict):
        return {}
    figs = result["metrics"] if isinstance(result.get("metrics"), dict) else result
    return {k: float(v) for k, v in figs.items() if _number(v)}


def _samples(rows: list[dict]) -> str:
    rows = [r for r in rows if "guardrail" not in r]  # a firing's example: the guardrails table shows it, with its message
    steps = [r["step"] for r in rows if _number(r.get("step"))]
    if not steps:
        return ""
    first, last = min(steps), max(steps)
    early = [r for r in rows if r.get("step") == first][:SAMPLES_SHOWN]
    late = [r for r in rows if r.get("step") == last][:SAMPLES_SHOWN] if last != first else []
    cells = "".join(f"<tr><td>{_sample(e)}</td><td>{_sample(l)}</td></tr>" for e, l in zip_longest(early, late))
    head = f"<tr><th>early (step {first})</th><th>late (step {last})</th></tr>" if late else f"<tr><th>step {first}</th><th></th></tr>"
    return f"<h2>Completions</h2><table class='samples'>{head}{cells}</table>"


def _sample(row: dict | None) -> str:
    if row is None:
        return ""
    prompt = row.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):  # chat messages
        prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    if "reference" in row:  # an SFT run: the greedy completion beside the completion it was trained on
        return (f"<div class='prompt'>{_esc(str(prompt))}</div><div class='meta'>reference</div>"
                f"{completion_html(str(row['reference']))}<div class='meta'>the model (greedy)</div>"
                f"{completion_html(str(row.get('completion', '')))}")
    rewards = row.get("rewards")
    scores = ", ".join(f"{k} {_fmt(v)}" for k, v in rewards.items()) if isinstance(rewards, dict) else ""
    return (f"<div class='prompt'>{_esc(str(prompt))}</div>"
            f"<div class='meta'>gold answer: {_esc(str(row.get('answer')))} &middot; reward {_fmt(row.get('reward'))}"
            f"{' (' + _esc(scores) + ')' if scores else ''}</div>{completion_html(str(row.get('completion', '')))}")


def completion_html(text: str) -> str:
    """The completion as blocks: <pre class='think'>, <pre class='answer'> and <pre class='other'> for the rest."""
    head, sep, tail = text.partition("</think>")
    if sep and "<think>" not in head:  # the prompt opened the think block
        return f"<pre class='think'>{_esc(head + sep)}</pre>" + completion_html(tail)
    blocks = []
    for piece in PART_RE.split(text):
        if piece.strip():
            kind = "think" if piece.startswith("<think>") else "answer" if piece.startswith("<answer>") else "other"
            blocks.append(f"<pre class='{kind}'>{_esc(piece)}</pre>")
    return "".join(blocks) or "<pre class='other'>(empty)</pre>"


def _load_json(path: Path):
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:  # not JSON (half-written, damaged) or a number past int()'s 4,300 digits
        return None  # the report goes on without it
    return data if isinstance(data, dict) else None


PAGE_START = "<!doctype html><html><head><meta charset='utf-8'><title>"  # every report's, since the first


def _is_report(path: Path) -> bool:
    """A regular file that starts as write_report's pages do (not a fifo, whose read would wait for a writer)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(PAGE_START)) == PAGE_START.encode()
    except OSError:
        return False


PLOT_MAX = 1e100  # a figure's size, at most, to be plotted


def _number(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer past a float's range (a hand-edited file): no figure to plot or show
        return False


def _fmt(v, sign: bool = False) -> str:
    if not _number(v):
        return "-"
    if abs(v) >= 1e6:  # (1e308 was 309 digits)
        return f"{v:{'+' if sign else ''}.3g}"
    return f"{v:{'+' if sign else ''}.{3 if abs(v) < 10 else 1}f}"  # rates to 0.001, lengths to 0.1


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1600px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
img { width: 520px; margin: 4px; border: 1px solid #eee; }
.note, .meta { color: #666; font-size: .9em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; vertical-align: top; }
td:first-child, th:first-child { text-align: left; }
table.samples td { text-align: left; width: 50%; }
table.samples { width: 100%; table-layout: fixed; }
pre { white-space: pre-wrap; word-break: break-word; margin: .3em 0; padding: .4em .6em; border-radius: 4px; }
pre.think { background: #eef4ff; border-left: 4px solid #5b8def; }
pre.answer { background: #eafbea; border-left: 4px solid #3aa655; font-weight: bold; }
pre.other { background: #f6f6f6; border-left: 4px solid #bbb; }
pre.think::before, pre.answer::before { display: block; font-size: .75em; color: #666; font-weight: normal; }
pre.think::before { content: "think"; } pre.answer::before { content: "answer"; }
table.events td.event { text-align: left; }
.prompt { font-style: italic; margin-bottom: .2em; white-space: pre-wrap; }
pre.config { background: #f6f6f6; }
"""
