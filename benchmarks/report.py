"""The results table: benchmarks/results/latest.md for people and latest.json for tools.

Each row is one figure of issue 6 with its target, the figure reached by
each contender that has one, whether the target is met, and a note. Where a
target is missed, the note carries the diagnosis found when the benchmark
was written (cause, and the file and function to change); it is shown only
while the figure misses, so a fixed engine drops it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .diagnoses import DIAGNOSES
from .fleet import fleet_lines
from .ledgers import ledger_lines
from .pools import pool_lines

__all__ = ["Row", "build_rows", "machine_facts", "render_markdown", "write"]

CONTENDER_NAMES = {
    "wanbatch": "wanbatch",
    "wanbatch_frugal": "wanbatch --tracking frugal",
    "sdk": "dashscope SDK (a)",
    "loop": "plain loop (b)",
}


@dataclass(slots=True, kw_only=True)
class Row:
    figure: str  #: "1".."7"
    measure: str
    target: str
    values: dict[str, str]  #: by contender name
    met: bool | None = None  #: for wanbatch; None where there is no target
    notes: list[str] = field(default_factory=list)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _utilisation_rows(util: dict[str, Any], *, figures: str = "1t234", clock: str = "") -> list[Row]:
    """Rows of figures 1-4 (those in ``figures``) for each model of ``util``; ``clock`` labels a non-default speed."""
    by_model = {model: runs for model, runs in util.items() if isinstance(runs, dict)}
    rows: list[Row] = []
    for figure in figures:
        for model, runs in by_model.items():
            rows.append(_ROW_MAKERS[figure](model + clock, runs))
    return rows


def _items(runs: dict[str, Any]) -> int:
    return next((run["items"] for _, run in _contenders(runs)), 0)


def _utilisation_row(label: str, runs: dict[str, Any]) -> Row:
    cells = {
        name: f"{_num(run['utilisation'], 4)} ({_num(run['makespan_s'])} s / {_num(run['bound_s'])} s)"
        if run["utilisation"]
        else "–"
        for name, run in _contenders(runs)
    }
    value = (runs.get("wanbatch") or {}).get("utilisation")
    met = value is not None and value <= 1.02
    return Row(
        figure="1",
        measure=f"quota utilisation, {label} ×{_items(runs)}: makespan / quota bound (simulated s)",
        target="≤ 1.02",
        values=cells,
        met=met,
        notes=_run_notes(runs) + ([] if met else ["utilisation"]),
    )


def _tracking_row(label: str, runs: dict[str, Any]) -> Row:
    cells = {name: _num(run["tracking_per_task"]) for name, run in _contenders(runs)}
    engine = runs.get("wanbatch") or {}
    value = engine.get("tracking_per_task")
    met = value is not None and value <= 1.2
    answers, tasks = engine.get("query_answers") or {}, engine.get("tasks") or 0
    split = ", ".join(f"{n / tasks:.2g} {status}" for status, n in sorted(answers.items()) if tasks)
    notes = []
    if split:
        lists = engine.get("lists", 0) / tasks
        notes.append(f"wanbatch's queries per task by the status they found: {split}; lists per task {lists:.2g}")
    frugal = (runs.get("wanbatch_frugal") or {}).get("tracking_per_task")
    if not met and frugal is not None and frugal <= 1.2:
        notes.append("met with --tracking frugal, at the detection lag of figure 3")
    return Row(
        figure="2",
        measure=f"tracking cost, {label}: query + list requests per task",
        target="≤ 1.2",
        values=cells,
        met=met,
        notes=notes + ([] if met else ["tracking"]),
    )


def _lag_row(label: str, runs: dict[str, Any]) -> Row:
    cells = {
        name: f"{_num(run['lag_p50_s'])} / {_num(run['lag_p99_s'])}" if run["tasks_detected"] else "–"
        for name, run in _contenders(runs)
    }
    engine = runs.get("wanbatch") or {}
    met = engine.get("lag_p50_s") is not None and engine["lag_p50_s"] <= 1 and engine["lag_p99_s"] <= 3
    return Row(
        figure="3",
        measure=f"detection lag p50 / p99, {label} (simulated s)",
        target="≤ 1 / ≤ 3",
        values=cells,
        met=met,
        notes=[] if met else ["lag"],
    )


def _throttle_row(label: str, runs: dict[str, Any]) -> Row:
    cells = {name: f"{run['throttled_steady']} ({run['throttled_cold']})" for name, run in _contenders(runs)}
    engine = runs.get("wanbatch") or {}
    met = engine.get("throttled_steady") == 0 if engine else None
    return Row(
        figure="4",
        measure=f"429s to creates in steady state (and in the first minute), {label}",
        target="0",
        values=cells,
        met=met,
        notes=["throttle"] if met is False else [],
    )


def _tail_row(label: str, runs: dict[str, Any]) -> Row:
    cells = {
        name: f"{_num(run.get('after_last_request_wall_s'))} s (run {_num(run['wall_s'])} s)"
        for name, run in _contenders(runs)
    }
    tail_s = (runs.get("wanbatch") or {}).get("after_last_request_wall_s") or 0.0
    note = (
        "wanbatch writes report.json, metadata.jsonl and gallery.html with a thumbnail per image after the last "
        "download (--no-gallery leaves the gallery out)"
    )
    return Row(
        figure="1",
        measure=f"real seconds from the last request to the end ({label}; whole run beside it)",
        target="–",
        values=cells,
        notes=[note] if tail_s > 5 else [],
    )


_ROW_MAKERS = {
    "1": _utilisation_row,
    "t": _tail_row,
    "2": _tracking_row,
    "3": _lag_row,
    "4": _throttle_row,
}


def _contenders(runs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, runs[name]) for name in CONTENDER_NAMES if isinstance(runs.get(name), dict)]


def _run_notes(runs: dict[str, Any]) -> list[str]:
    notes = []
    for name, run in _contenders(runs):
        if run["images_saved"] != run["images_billed"] or run["failed"] or (run["exit_code"] not in (0, None)):
            notes.append(
                f"{CONTENDER_NAMES[name]}: {run['images_saved']} saved of {run['images_billed']} billed, "
                f"{run['failed']} failed, exit {run['exit_code']}"
            )
        notes += [f"{CONTENDER_NAMES[name]}: {note}" for note in run.get("notes", [])]
    return notes


def _ceiling_rows(ceiling: dict[str, Any]) -> list[Row]:
    rows = []
    for key, label in (("n4", "n=4"), ("n1", "n=1")):
        run = ceiling.get(key)
        if not run:
            continue
        met = (run["images_per_s"] or 0) >= 500
        rows.append(
            Row(
                figure="5",
                measure=(
                    f"engine ceiling, {label}, 512*512, unlimited quotas, zero durations ×{run['items']} items: "
                    "saved verified images/s (whole process; steady part)"
                ),
                target="≥ 500",
                values={"wanbatch": f"{_num(run['images_per_s'])}; {_num(run['images_per_s_steady'])}"},
                met=met,
                notes=[] if met else ["ceiling"],
            )
        )
    cpu = {k: ceiling[k]["cpu_s_per_1000_images"] for k in ("n4", "n1") if ceiling.get(k)}
    if cpu:
        rows.append(
            Row(
                figure="5",
                measure="engine CPU s per 1,000 images (n=4; n=1), user + system of the engine process",
                target="–",
                values={"wanbatch": "; ".join(_num(v) for v in cpu.values())},
            )
        )
    diagnostics = (
        ("n4_no_gallery", "without the gallery", ""),
        ("n4_no_guard", "without the gallery and pacing guard", ""),
        ("n4_one_prompt", "without the gallery, one prompt repeated (repeats:)", "one_prompt"),
    )
    for key, label, diagnosis in diagnostics:
        diag = ceiling.get(key)
        if diag:
            rows.append(
                Row(
                    figure="5",
                    measure=f"diagnostic: ceiling n=4 {label} ×{diag['items']} (images/s: whole process; steady part)",
                    target="–",
                    values={"wanbatch": f"{_num(diag['images_per_s'])}; {_num(diag['images_per_s_steady'])}"},
                    notes=[f"CPU s per 1,000 images {_num(diag['cpu_s_per_1000_images'])}"]
                    + ([diagnosis] if diagnosis else []),
                )
            )
    return rows + _store_rows(ceiling)


def _store_rows(ceiling: dict[str, Any]) -> list[Row]:
    """The n=4 ceiling into object storage beside the same run into a folder: images/s, then CPU per image."""
    pairs = [
        (label, ceiling[disk], ceiling[store])
        for label, disk, store in (
            ("", "n4", "n4_store"),
            (" without the gallery", "n4_no_gallery", "n4_store_no_gallery"),
        )
        if ceiling.get(disk) and ceiling.get(store)
    ]
    rows = []
    for label, disk, store in pairs:
        rows.append(
            Row(
                figure="5",
                measure=(
                    f"ceiling n=4{label} ×{store['items']} into an S3 store (SeaweedFS on loopback, --out s3://…) "
                    "against the local disk: saved images/s (whole process; steady part)"
                ),
                target="–",
                values={
                    "wanbatch": f"store {_num(store['images_per_s'])}; {_num(store['images_per_s_steady'])}, "
                    f"disk {_num(disk['images_per_s'])}; {_num(disk['images_per_s_steady'])} "
                    f"(store / disk {_ratio(store['images_per_s'], disk['images_per_s'])}; "
                    f"{_ratio(store['images_per_s_steady'], disk['images_per_s_steady'])})"
                },
                notes=[] if label else ["at 512*512 an image is its own thumbnail: the gallery stores only its page"],
            )
        )
    if pairs:
        rows.append(
            Row(
                figure="5",
                measure=(
                    "CPU s per 1,000 images into the S3 store (n=4"
                    + ("; without the gallery" if len(pairs) > 1 else "")
                    + "): the engine process (into the local disk beside it); SeaweedFS's process, on the same cores"
                ),
                target="–",
                values={
                    "wanbatch": "; ".join(
                        f"engine {_num(store['cpu_s_per_1000_images'])} (disk {_num(disk['cpu_s_per_1000_images'])}),"
                        f" server {_num(store.get('server_cpu_s_per_1000_images'))}"
                        for _, disk, store in pairs
                    )
                },
            )
        )
    return rows


def _ratio(part: float | None, whole: float | None) -> str:
    return "–" if not part or not whole else f"{part / whole:.2f}"


def _scale_rows(scale: dict[str, Any]) -> list[Row]:
    if not scale:
        return []
    items = scale["items"]
    plan, resume, first = scale.get("plan", {}), scale.get("resume", {}), scale.get("first_run", {})
    rows = []
    met = plan.get("exit_code") == 0 and plan["wall_s"] <= 10 and plan["max_rss_mb"] <= 300
    rows.append(
        Row(
            figure="6",
            measure=f"wanbatch plan of a {items:,}-item manifest: time; peak RSS",
            target="≤ 10 s; ≤ 300 MB",
            values={"wanbatch": f"{_num(plan.get('wall_s'))} s; {_num(plan.get('max_rss_mb'))} MB"},
            met=met,
            notes=[] if met else ["plan"],
        )
    )
    value = resume.get("to_first_request_s")
    met = value is not None and value <= 5
    rows.append(
        Row(
            figure="6",
            measure=f"resume of a run folder with a {items:,}-item ledger: process start to first request",
            target="≤ 5 s",
            values={"wanbatch": f"{_num(value)} s; peak RSS {_num(resume.get('max_rss_mb'))} MB"},
            met=met,
            notes=[] if met else ["resume"],
        )
    )
    rows.append(
        Row(
            figure="6",
            measure=f"for reference: first run of the {items:,} items into a new folder, start to first request",
            target="–",
            values={
                "wanbatch": f"{_num(first.get('to_first_request_s'))} s; peak RSS {_num(first.get('max_rss_mb'))} MB"
            },
        )
    )
    return rows


def _capacity_rows(capacity: dict[str, Any], peak_rps: float | None) -> list[Row]:
    if not capacity:
        return []
    served = {k: v["per_s"] for k, v in capacity.items() if isinstance(v, dict)}
    slowest = min(served.values()) if served else None
    met = None if peak_rps is None or slowest is None else slowest > 2 * peak_rps
    return [
        Row(
            figure="7",
            measure="simulator capacity, requests/s served (create; query; image), one client core",
            target="well above the busiest run of 1-6",
            values={"wanbatch": "; ".join(f"{k} {_num(v)}" for k, v in served.items())},
            met=met,
            notes=[f"busiest run of 1-6 asked {_num(peak_rps)} requests/s of it"] if peak_rps else [],
        )
    ]


def peak_load(results: dict[str, Any]) -> float | None:
    """The most requests per wall second any run of 1-6 asked of the simulator."""
    loads = []
    for section in ("utilisation", "cold_start"):
        for runs in (results.get(section) or {}).values():
            if isinstance(runs, dict):
                loads += [run.get("sim_load_rps") for _, run in _contenders(runs)]
    for key, run in (results.get("ceiling") or {}).items():
        if key != "profile" and isinstance(run, dict):
            loads.append(run.get("sim_load_rps"))
    loads = [x for x in loads if x]
    return max(loads) if loads else None


def build_rows(results: dict[str, Any]) -> list[Row]:
    util, slow = results.get("utilisation") or {}, results.get("slow_clock") or {}
    speed = next((run["speed"] for runs in slow.values() for _, run in _contenders(runs)), None)
    rows: list[Row] = []
    for figure in "1t234":
        rows += _utilisation_rows(util, figures=figure)
        if figure in "123":
            rows += _utilisation_rows(slow, figures=figure, clock=f" on a clock {speed:g}x" if speed else "")
    for model, runs in (results.get("cold_start") or {}).items():
        cells = {name: f"{run['throttled_cold']} ({run['creates']} creates)" for name, run in _contenders(runs)}
        rows.append(
            Row(
                figure="4",
                measure=f"429s at a cold start of {model} (5 RPS; over 3 in the first second from idle are refused)",
                target="report",
                values=cells,
            )
        )
    rows += _ceiling_rows(results.get("ceiling") or {})
    rows += _scale_rows(results.get("scale") or {})
    rows += _capacity_rows(results.get("capacity") or {}, peak_load(results))
    rows += _statements_rows(results.get("statements") or {})
    return rows


#: Statements per task (n=1 with the gallery; without it; n=4) measured before the ledger's writes returned
#: what they wrote, when the stages read back each row they had just written: the figure is to stay below.
STATEMENTS_BEFORE = {"n1": 37.3, "n1_no_gallery": 34.3, "n4": 49.3}


def _statements_rows(counted: dict[str, Any]) -> list[Row]:
    if not counted:
        return []
    runs = [(key, counted[key]) for key in STATEMENTS_BEFORE if isinstance(counted.get(key), dict)]
    reads = "; ".join(_num(run["by_kind_per_task"]["read"]) for _, run in runs)
    commits = "; ".join(_num(run["commits_per_task"]) for _, run in runs)
    met = all(run["statements_per_task"] < STATEMENTS_BEFORE[key] for key, run in runs)
    return [
        Row(
            figure="8",
            measure=(
                f"ledger: SQLite statements per finished task (n=1; n=1 without the gallery; n=4)"
                f" ×{runs[0][1]['items']} items"
            ),
            target="< " + "; ".join(_num(STATEMENTS_BEFORE[key]) for key, _ in runs) + " (before)",
            values={"wanbatch": "; ".join(_num(run["statements_per_task"]) for _, run in runs)},
            met=met,
            notes=[f"of which reads {reads}; commits {commits} (before: reads 16.2; 13.2; 16.2)"],
        )
    ]


def machine_facts() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError:
            return ""

    cpu = next(
        (line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines() if "model name" in line), ""
    )
    mem = next((line.split()[1] for line in read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "0")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem) / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "tree_changed": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()
    except OSError:
        return ""


def render_markdown(doc: dict[str, Any]) -> str:
    rows = [Row(**row) for row in doc["rows"]]
    machine, settings = doc["machine"], doc["settings"]
    lines = [
        "# wanbatch benchmarks: latest results",
        "",
        f"Run finished {doc['date']} on {machine['cpu']} ({machine['cores']} cores, {machine['memory_gb']} GB), "
        f"{machine['platform']}, Python {machine['python']}; commit {machine['commit']}"
        + (" with uncommitted changes" if machine["tree_changed"] else "")
        + (
            f" at the start, {machine['commit_end']} at the end (each program measured ran the tree of its moment)"
            if machine.get("commit_end", machine["commit"]) != machine["commit"]
            else ""
        )
        + f"; load average at start {', '.join(f'{x:.2f}' for x in machine['load_average'])}.",
        "",
        f"Settings: {settings_line(settings)}. How each figure is measured: [../README.md](../README.md).",
        "",
        "| # | figure | target | " + " | ".join(CONTENDER_NAMES.values()) + " | met | notes |",
        "|---|---|---|" + "---|" * len(CONTENDER_NAMES) + "---|---|",
    ]
    cited: list[str] = []
    for row in rows:
        cells = [row.values.get(name, "–") for name in CONTENDER_NAMES]
        met = {True: "yes", False: "**no**", None: "–"}[row.met]
        notes = []
        for note in row.notes:
            if note in DIAGNOSES:
                cited += [] if note in cited else [note]
                note = f"missed: see diagnosis {cited.index(note) + 1} below"
            notes.append(note)
        text = "; ".join(notes).replace("|", "\\|")
        lines.append(f"| {row.figure} | {row.measure} | {row.target} | " + " | ".join(cells) + f" | {met} | {text} |")
    if cited:
        lines += ["", "## Diagnoses of the missed targets", ""]
        lines += [f"{number}. **{key}**: {DIAGNOSES[key]}" for number, key in enumerate(cited, start=1)]
    lines += ["", *_profile_lines(doc["results"].get("ceiling") or {})]
    lines += gallery_lines(doc["results"].get("gallery"))
    lines += pool_lines(doc["results"].get("pools"))
    lines += fleet_lines(doc["results"].get("fleet"))
    lines += ledger_lines(doc["results"].get("ledgers"))
    return "\n".join(lines) + "\n"


def gallery_lines(gallery: dict[str, Any] | None) -> list[str]:
    """The section of latest.md: one row per size, with the machine, date and commit it was measured on."""
    if not gallery:
        return []
    machine = gallery["machine"]
    lines = [
        "## The gallery at scale",
        "",
        f"Measured {gallery['date']} on {machine['cpu']} ({machine['cores']} cores), commit {machine['commit']}"
        + (" with uncommitted changes" if machine["tree_changed"] else "")
        + f"; load average at start {', '.join(f'{x:.2f}' for x in machine['load_average'])}."
        " A synthetic run folder per size (`python -m benchmarks.gallery`; how: its docstring). Thumbnails are"
        " made while a run saves its images, in worker threads; the end of a run writes the page and any still"
        " missing.",
        "",
        "| images | gallery.html | gallery-data.js | end of run: write the page | a thumbnail while saving"
        " (workers) | a thumbnail at the end (every core) | end of run if none were made while saving"
        " | first cards in Chromium |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in gallery["sizes"]:
        first = "–" if row["first_cards_ms"] is None else f"{row['first_cards_ms']:,} ms"
        lines.append(
            f"| **{row['images']:,}** | {row['page_bytes']:,} B | {row['data_bytes'] / 1e6:.1f} MB"
            f" | {row['end_of_run_s']:.2f} s | {row['thumb_while_saving_ms']:.1f} ms ({row['thumb_workers']})"
            f" | {row['thumb_at_end_ms']:.1f} ms | {row['end_of_run_all_thumbs_s']:,.1f} s"
            f" (thumbnails timed on {row['thumb_sample']:,}) | {first} |"
        )
    return [*lines, ""]


def settings_line(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def _profile_lines(ceiling: dict[str, Any]) -> list[str]:
    profile = ceiling.get("profile")
    if not profile:
        return []
    run = profile["run"]
    lines = [
        "## Where the engine's time goes (figure 5)",
        "",
        "cProfile of the engine process in the ceiling run without gallery and pacing guard "
        f"(n=4, {run['items']} items; the profiler roughly doubles the cost). "
        f"Process CPU {_num(run['cpu_s'])} s, of which the event loop's thread "
        f"{_num(run.get('main_thread_cpu_s'))} s; cProfile sees only that thread "
        "(file writes and PNG checks run in worker threads).",
        "",
        "| area | own time (s) | share |",
        "|---|---|---|",
    ]
    for area, value in profile["areas"].items():
        lines.append(f"| {area} | {value['s']:.2f} | {value['share']:.0%} |")
    lines += ["", "| function | own s | cumulative s | calls |", "|---|---|---|---|"]
    for entry in profile["top"]:
        lines.append(
            f"| `{entry['function']}` | {entry['own_s']:.2f} | {entry['cumulative_s']:.2f} | {entry['calls']} |"
        )
    return [*lines, ""]


def write(
    out_dir: Path,
    *,
    results: dict[str, Any],
    settings: dict[str, Any],
    machine: dict[str, Any],
    date: str | None = None,
) -> Path:
    """Write latest.json and latest.md into ``out_dir`` (``date``: when measured, default now); the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "settings": settings,
        "rows": [asdict(row) for row in build_rows(results)],
        "results": results,
    }
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=1, default=_plain) + "\n", encoding="utf-8")
    path = out_dir / "latest.md"
    path.write_text(render_markdown(doc), encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Callable):
        return getattr(value, "__name__", str(value))
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
