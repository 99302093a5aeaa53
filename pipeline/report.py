"""`aigc report`: one self-contained HTML page of a run directory.

The page holds, for every stage of the run: its state (as `aigc status` judges it: completed, failed, stale,
not run), wall time and fingerprint on a drawn stage graph (edges: each stage's registered inputs); its metrics
(the manifest's, values exact); curves drawn as inline SVG from the logs the stages write (`train_log.jsonl`,
pretrain's checkpoint `train_state.json`, `curve.json`); the images it wrote (loss curves, sample grids, renders,
GIFs) inlined as base64 data URIs; sample generations (evaluate's `report.json`, serve's `answer.json`); and the
lineage of its artifacts: each output (role, path, sha256) and the upstream fingerprints it consumed.

Nothing on the page reaches the network: no scripts, inline CSS, images as data URIs, and a
Content-Security-Policy that forbids any other load. Every text read from a run (manifests, logs, samples,
corpus text) is HTML-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import math
import os
import signal
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline.runner import stage_dir, stage_states
from pipeline.stage import get_stage, load_registry

REPORT_FILE = "report.html"
SERVE_HOST = "127.0.0.1"  # never another interface: the page shows a run's configs and data
DEFAULT_PORT = 8088
# what the page may load: nothing but its own inline style and data: images
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

IMAGE_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MAX_IMAGE_BYTES = 8 << 20  # one image larger than this is listed, not inlined
MAX_TOTAL_IMAGE_BYTES = 64 << 20  # the page's whole image budget
MAX_DIR_IMAGES = 6  # images shown of one output directory (spread over it, first and last included)
MAX_LOG_BYTES = 32 << 20  # logs and JSON read for curves and samples
MAX_PLOT_POINTS = 1500
STATE_COLOURS = {  # state -> (text, fill)
    "completed": ("#1b5e20", "#e8f5e9"), "failed": ("#b71c1c", "#ffebee"), "stale": ("#8d5a00", "#fff8e1"),
    "not run": ("#555", "#f2f2f2"),
}
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def esc(value: Any) -> str:
    """Return `value` as HTML text (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    """Return `text` as an id fragment of [A-Za-z0-9_-]."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in text)


@dataclasses.dataclass
class StageView:
    """What the page shows of one stage."""

    name: str
    chain: str
    inputs: tuple[str, ...]  # registered upstream stages
    state: str
    record: dict | None  # the record `aigc status` judged: manifest or failure record
    manifest: dict | None  # the completed manifest in <run-dir>/<stage>/ (that of the last good run if failed)
    key_metrics: tuple[str, ...]

    @property
    def failure(self) -> dict | None:
        return self.record if self.state == "failed" else None

    @property
    def wall_time_s(self) -> float | None:
        wall = (self.record or {}).get("wall_time_s")
        return wall if isinstance(wall, (int, float)) else None

    @property
    def fingerprint(self) -> str:
        return str((self.record or {}).get("fingerprint", ""))


def report_stages(run_dir: Path, chain: str) -> list[str]:
    """Return the stages a report of `run_dir` shows: the chain its last run ran, and any other with output there."""
    registry = load_registry()
    names = set(registry.chain(chain)) if chain in registry.chains else set()
    for name in registry.stages:
        if stage_dir(run_dir, name).is_dir() or stage_dir(run_dir, f"{name}.tmp").is_dir():
            names.add(name)
    return [n for n in registry.stages if n in names]


def collect(run_dir: Path, names: list[str], fingerprints: dict[str, str]) -> list[StageView]:
    """Return the view of each stage in `names`, judged against its planned fingerprint where there is one."""
    registry = load_registry()
    chain_of = {}
    for chain, members in registry.chains.items():
        for member in members:
            chain_of.setdefault(member, chain)
    views = []
    for name, (state, record) in stage_states(run_dir, names, fingerprints).items():
        manifest = record if record and record.get("status") == "completed" else None
        if manifest is None:
            try:
                manifest = mf.read_manifest(stage_dir(run_dir, name))
            except (OSError, ValueError):
                manifest = None
        stage = get_stage(name)
        views.append(StageView(name, chain_of.get(name, "other"), stage.inputs, state, record, manifest,
                               stage.key_metrics))
    return views


# ---------------------------------------------------------------- values


def format_value(value: Any, limit: int = 2000) -> str:
    """Return a metric value as HTML: numbers exact (JSON), text as it is, lists and objects as compact JSON."""
    if isinstance(value, str):
        return esc(value)
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text)} characters)"
    return f"<code>{esc(text)}</code>" if isinstance(value, (list, dict)) else esc(text)


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def read_json(path: Path) -> Any:
    """Return the JSON of `path`, or None where it is missing, too large or not JSON."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_LOG_BYTES:
            return None
        return json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Return the JSON objects of the lines of `path` (others skipped)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_LOG_BYTES:
            return []
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def output_path(run_dir: Path, view: StageView, role: str) -> Path | None:
    """Return the path of output `role` of the stage's manifest, or None (no such output, or outside the stage)."""
    outputs = (view.manifest or {}).get("outputs", {})
    rel = outputs.get(role, {}).get("path") if isinstance(outputs.get(role), dict) else None
    if not rel:
        return None
    root = stage_dir(run_dir, view.name).resolve()
    path = (root / rel).resolve()
    return path if path == root or root in path.parents else None


# ---------------------------------------------------------------- curves


@dataclasses.dataclass
class Chart:
    title: str
    series: list[tuple[str, list[tuple[float, float]]]]
    xlabel: str = "step"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def charts_from_records(prefix: str, records: list[dict]) -> list[Chart]:
    """Return one chart per numeric field of per-step records (grouped by "phase"); `val_X` joins X's chart."""
    phases: dict[str, list[dict]] = {}
    for record in records:
        phases.setdefault(str(record.get("phase", "")), []).append(record)
    charts = []
    for phase, rows in phases.items():
        xkey = next((k for k in ("step", "iteration", "epoch") if any(_finite(r.get(k)) for r in rows)), "")
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k, v in row.items() if k not in keys and k not in ("step", "iteration", "epoch")
                        and _finite(v))
        title = f"{prefix} · {phase}" if phase else prefix
        for key in keys:
            if key.startswith("val_") and key[4:] in keys:
                continue
            series = []
            for name in (key, f"val_{key}"):
                points = [(float(r[xkey]) if xkey else float(i), float(r[name])) for i, r in enumerate(rows, 1)
                          if _finite(r.get(name)) and (not xkey or _finite(r.get(xkey)))]
                if points:
                    series.append(("held-out" if name != key else "train" if f"val_{key}" in keys else key, points))
            charts.append(Chart(f"{title} · {key}", series, xkey or "record"))
    return charts


def stage_charts(run_dir: Path, view: StageView) -> list[Chart]:
    """Return the curves the stage's logs hold: train_log.jsonl, a checkpoint's train_state.json, curve.json."""
    if view.manifest is None:
        return []
    charts: list[Chart] = []
    for role, out in view.manifest.get("outputs", {}).items():
        path = output_path(run_dir, view, role)
        if path is None or not isinstance(out, dict):
            continue
        if path.is_file() and path.suffix == ".jsonl" and "log" in role:
            charts += charts_from_records(view.name, read_jsonl(path))
        elif path.is_file() and path.suffix == ".json":
            doc = read_json(path)
            if isinstance(doc, dict) and isinstance(doc.get("columns"), list) and isinstance(doc.get("rows"), list):
                columns = [str(c) for c in doc["columns"]]
                rows = [dict(zip(columns, row)) for row in doc["rows"] if isinstance(row, list)]
                rows = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # times: not curves
                if columns:
                    rows = [dict(r, step=r.get(columns[0])) for r in rows]
                charts += charts_from_records(f"{view.name} · {role}", rows)
        elif path.is_dir() and role == "checkpoint":
            states = sorted(path.glob("step_*/train_state.json"))
            state = read_json(states[-1]) if states else None
            if isinstance(state, dict):
                rows: dict[float, dict] = {}
                for key, name in (("train", "loss"), ("val", "val_loss"), ("grad_norm", "grad_norm")):
                    for pair in state.get(key) or []:
                        if isinstance(pair, list) and len(pair) == 2 and _finite(pair[0]):
                            rows.setdefault(pair[0], {"step": pair[0]})[name] = pair[1]
                charts += charts_from_records(view.name, [rows[k] for k in sorted(rows)])
    return [c for c in charts if c.series]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Return round tick values covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_PLOT_POINTS:
        return points
    every = math.ceil(len(points) / MAX_PLOT_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def svg_chart(chart: Chart) -> str:
    """Return `chart` as an inline SVG line plot (axes, ticks, legend)."""
    width, height, left, right, top, bottom = 520, 230, 62, 14, 30, 38
    points = [p for _, pts in chart.series for p in pts]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(chart.title)}" xmlns="http://www.w3.org/2000/svg"><title>{esc(chart.title)}</title>',
             f'<text x="{left}" y="16" class="ct">{esc(chart.title)}</text>']
    for y in yt:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{y:.4g}</text>')
    for x in xt:
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 15}" class="tick" text-anchor="middle">'
                     f'{x:.4g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
                 'class="frame"/>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" class="tick" '
                 f'text-anchor="middle">{esc(chart.xlabel)}</text>')
    legend_x = width - right
    for i, (label, pts) in enumerate(reversed(chart.series)):
        colour = SERIES_COLOURS[(len(chart.series) - 1 - i) % len(SERIES_COLOURS)]
        legend_x -= 12 + 7 * len(label)
        parts.append(f'<rect x="{legend_x}" y="8" width="9" height="9" fill="{colour}"/>'
                     f'<text x="{legend_x + 12}" y="16" class="tick">{esc(label)}</text>')
    for i, (label, pts) in enumerate(chart.series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        pts = _thin(pts)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if len(pts) <= 40:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{colour}">'
                      f'<title>{esc(label)}: {x:g}, {y:.6g}</title></circle>' for x, y in pts]
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- images


@dataclasses.dataclass
class Image:
    label: str
    path: Path
    data_uri: str = ""
    width: int = 0
    height: int = 0
    skipped: str = ""  # why it is listed and not inlined


def image_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) of PNG or GIF bytes ((0, 0) for others)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return 0, 0


def _spread(files: list[Path], count: int) -> list[Path]:
    if len(files) <= count:
        return files
    return [files[round(i * (len(files) - 1) / (count - 1))] for i in range(count)]


class ImageBudget:
    """Inlines images up to a total size; remembers the bytes it has inlined to skip duplicates."""

    def __init__(self, total: int = MAX_TOTAL_IMAGE_BYTES):
        self.left = total
        self.seen: set[str] = set()

    def load(self, label: str, path: Path) -> Image | None:
        """Return the image at `path` inlined (or listed with why not); None for a duplicate."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            return Image(label, path, skipped=f"unreadable: {exc.strerror}")
        if size > MAX_IMAGE_BYTES or size > self.left:
            return Image(label, path, skipped=f"{human_bytes(size)}: too large to inline")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.seen:
            return None
        self.seen.add(digest)
        self.left -= size
        width, height = image_size(data)
        uri = f"data:{IMAGE_TYPES[path.suffix.lower()]};base64," + base64.b64encode(data).decode()
        return Image(label, path, uri, width, height)


def stage_images(run_dir: Path, view: StageView, budget: ImageBudget) -> list[Image]:
    """Return the images among the stage's outputs: image files, and some of those in output directories."""
    images: list[Image] = []
    paths = [(role, output_path(run_dir, view, role)) for role in (view.manifest or {}).get("outputs", {})]
    paths = [(role, path) for role, path in paths if path is not None]
    for role, path in sorted(paths, key=lambda item: item[1].is_dir()):  # files first: a grid beats its copy
        if path.is_file() and path.suffix.lower() in IMAGE_TYPES:
            found = [(role, path)]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_TYPES)
            found = [(f"{role}: {p.name}", p) for p in _spread(files, MAX_DIR_IMAGES)]
        else:
            continue
        for label, file in found:
            image = budget.load(label, file)
            if image is not None:
                images.append(image)
    return images


def img_tag(image: Image, run_dir: Path) -> str:
    rel = esc(os.path.relpath(image.path, run_dir))
    if image.skipped:
        return f'<figure class="missing"><figcaption>{esc(image.label)} ({rel}): {esc(image.skipped)}</figcaption></figure>'
    size = ""
    if 0 < image.width < 200:  # small renders: scaled up, pixels kept sharp
        scale = max(1, 160 // image.width)
        size = f' width="{image.width * scale}" height="{image.height * scale}" class="px"'
    elif image.width:
        size = f' width="{image.width}" height="{image.height}"'
    return (f'<figure><img src="{image.data_uri}" alt="{esc(image.label)}"{size}>'
            f'<figcaption>{esc(image.label)} <span class="dim">{rel}</span></figcaption></figure>')


# ---------------------------------------------------------------- samples


def stage_samples(run_dir: Path, view: StageView) -> dict[str, dict[str, str]]:
    """Return prompt -> {model: generated text} of the generations the stage recorded (evaluate's greedy samples
    per model in report.json, serve's answer.json)."""
    samples: dict[str, dict[str, str]] = {}
    for role in (view.manifest or {}).get("outputs", {}):
        path = output_path(run_dir, view, role)
        if path is None or path.suffix != ".json" or not path.is_file():
            continue
        doc = read_json(path)
        if not isinstance(doc, dict):
            continue
        models = doc.get("models")
        if isinstance(models, dict):
            for model, result in models.items():
                for sample in (result.get("samples") or []) if isinstance(result, dict) else []:
                    if isinstance(sample, dict) and "prompt" in sample:
                        reply = sample.get("reply", sample.get("answer", sample.get("text", "")))
                        samples.setdefault(str(sample["prompt"]), {})[f"{model} (greedy)"] = str(reply)
        if "prompt" in doc and "answer" in doc:
            samples.setdefault(str(doc["prompt"]), {})[str(doc.get("model", role))] = str(doc["answer"])
    return samples


def samples_table(samples: dict[str, dict[str, str]]) -> str:
    """Return a table of prompts (rows) by model (columns), every text escaped."""
    models: list[str] = []
    for replies in samples.values():
        models += [m for m in replies if m not in models]
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    rows = "".join(
        f"<tr><td><pre>{esc(prompt)}</pre></td>"
        + "".join(f"<td><pre>{esc(replies[m])}</pre></td>" if m in replies else "<td>–</td>" for m in models)
        + "</tr>" for prompt, replies in samples.items())
    return f'<table class="samples"><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{rows}</tbody></table>'


# ---------------------------------------------------------------- the stage graph


def svg_graph(views: list[StageView]) -> str:
    """Return the stage graph as inline SVG: a row of boxes per chain, an arrow per registered input."""
    node_w, node_h, col_w, row_h, pad = 150, 62, 190, 78, 16
    shown = {v.name: v for v in views}
    chains: dict[str, list[StageView]] = {}
    for view in views:
        chains.setdefault(view.chain, []).append(view)
    pos: dict[str, tuple[float, float]] = {}
    y_top = pad
    width = pad
    blocks = []
    for chain, members in chains.items():
        depth: dict[str, int] = {}
        for view in members:  # registry order: inputs first
            depth[view.name] = 1 + max((depth[i] for i in view.inputs if i in depth), default=-1)
        slots: dict[int, int] = {}
        spans = [depth[v.name] - depth[i] for v in members for i in v.inputs if i in depth]
        lift = 16 + 14 * max(spans, default=1) if any(s > 1 for s in spans) else 22
        block_top = y_top
        for view in members:
            d = depth[view.name]
            row = slots.get(d, 0)
            slots[d] = row + 1
            pos[view.name] = (pad + d * col_w, block_top + lift + row * row_h)
        rows = max(slots.values())
        blocks.append((chain, block_top))
        width = max(width, pad + (max(slots) + 1) * col_w)
        y_top = block_top + lift + rows * row_h + 8
    height = y_top + pad
    parts = [f'<svg class="graph" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             'aria-label="stage graph" xmlns="http://www.w3.org/2000/svg"><title>stage graph</title>'
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>']
    for chain, top in blocks:
        parts.append(f'<text x="{pad}" y="{top + 12}" class="chain">chain {esc(chain)}</text>')
    for view in views:  # edges under the boxes
        x2, y2 = pos[view.name]
        for up in view.inputs:
            if up not in shown:
                continue
            x1, y1 = pos[up]
            span = round((x2 - x1) / col_w)
            if span == 1 or y1 != y2:
                sx, sy, ex, ey = x1 + node_w, y1 + node_h / 2, x2, y2 + node_h / 2
                bend = (ex - sx) / 2
                d = f"M{sx},{sy} C{sx + bend},{sy} {ex - bend},{ey} {ex},{ey}"
            else:  # skips boxes of its row: an arc above them, top to top (longer arcs outside shorter ones)
                sx, ex, ey = x1 + node_w * min(0.4 + 0.1 * span, 0.9), x2 + node_w * max(0.6 - 0.1 * span, 0.1), y2
                lift = 14 * span
                d = f"M{sx},{y1} C{sx},{y1 - lift} {ex},{ey - lift} {ex},{ey}"
            parts.append(f'<path d="{d}" class="edge" marker-end="url(#arrow)"><title>{esc(view.name)} &lt;- '
                         f'{esc(up)}</title></path>')
    for view in views:
        x, y = pos[view.name]
        ink, fill = STATE_COLOURS.get(view.state, ("#0d47a1", "#e3f2fd"))
        wall = f"{view.wall_time_s:.1f} s" if view.wall_time_s is not None else "–"
        parts.append(
            f'<a href="#stage-{esc(slug(view.name))}"><g class="node" data-stage="{esc(view.name)}">'
            f'<rect x="{x}" y="{y}" width="{node_w}" height="{node_h}" rx="6" fill="{fill}" stroke="{ink}"/>'
            f'<text x="{x + 8}" y="{y + 17}" class="nn">{esc(view.name)}</text>'
            f'<text x="{x + 8}" y="{y + 34}" class="ns" fill="{ink}">{esc(view.state)}</text>'
            f'<text x="{x + node_w - 8}" y="{y + 34}" class="nw" text-anchor="end">{esc(wall)}</text>'
            f'<text x="{x + 8}" y="{y + 52}" class="nf">{esc(view.fingerprint or "no fingerprint")}</text>'
            f'<title>{esc(view.name)}: {esc(view.state)}, {esc(wall)}, fingerprint '
            f'{esc(view.fingerprint or "–")}</title></g></a>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- the page


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#eceff1;padding:14px 24px}header h1{margin:0 0 4px;font-size:20px}
header .meta{font-size:12px;color:#b0bec5}main{padding:12px 24px 40px;max-width:1400px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px;color:#37474f}
table{border-collapse:collapse;margin:4px 0 10px;background:#fff}
caption{text-align:left;font-size:12px;color:#555;padding:2px 0}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #e0e0e0;padding:6px 8px;margin:2px 0;
max-height:420px;overflow:auto}
.state{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;border:1px solid}
section.stage{background:#fff;border:1px solid #ddd;border-radius:6px;padding:4px 16px 12px;margin:16px 0}
section.stage>h2{border:0;margin-top:10px}.dim{color:#777;font-size:12px}
div.metrics{display:flex;flex-wrap:wrap;gap:0 14px;align-items:flex-start}
.charts,.images{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #e0e0e0;padding:6px}figure img{display:block;max-width:100%;height:auto}
figure img.px{image-rendering:pixelated}.charts figure img{width:520px}figcaption{font-size:12px;margin-top:4px}
figure.missing{color:#8d5a00}.graph{max-width:100%;height:auto;background:#fff;border:1px solid #ddd}
.graph a{cursor:pointer}.edge{fill:none;stroke:#888;stroke-width:1.3}.nn{font-weight:700;font-size:13px}
.ns{font-size:11px;font-weight:600}.nw{font-size:11px;fill:#444}.nf{font:10px ui-monospace,monospace;fill:#666}
.chain{font-size:12px;fill:#777;font-weight:600}
.chart{background:#fff;border:1px solid #e0e0e0}.chart .ct{font-size:12px;font-weight:600}
.chart .tick{font-size:10px;fill:#555}.chart .grid{stroke:#eee}.chart .frame{fill:none;stroke:#bbb}
td.metric-value{max-width:760px;word-break:break-word}details{margin:6px 0}summary{cursor:pointer;color:#37474f}
.ok{color:#1b5e20}.warn{color:#8d5a00}
"""


def state_badge(state: str) -> str:
    ink, fill = STATE_COLOURS.get(state, ("#0d47a1", "#e3f2fd"))
    return f'<span class="state" style="color:{ink};background:{fill};border-color:{ink}">{esc(state)}</span>'


def key_metrics_text(view: StageView) -> str:
    metrics = (view.manifest or {}).get("metrics", {}) if view.state in ("completed", "stale") else {}
    names = [k for k in view.key_metrics if k in metrics] or [
        k for k, v in metrics.items() if _finite(v)][:4]
    return " ".join(f"{esc(k)}={format_value(metrics[k], 80)}" for k in names)


def summary_table(views: list[StageView]) -> str:
    rows = []
    for view in views:
        wall = f"{view.wall_time_s:.1f}" if view.wall_time_s is not None else ""
        inputs = ", ".join(f'<a href="#stage-{esc(slug(i))}">{esc(i)}</a>' for i in view.inputs) or "–"
        rows.append(f'<tr data-stage="{esc(view.name)}"><td><a href="#stage-{esc(slug(view.name))}">'
                    f'{esc(view.name)}</a></td><td>{esc(view.chain)}</td><td>{inputs}</td>'
                    f'<td data-state="{esc(view.state)}">{state_badge(view.state)}</td><td class="num">{wall}</td>'
                    f'<td class="mono">{esc(view.fingerprint)}</td><td>{key_metrics_text(view)}</td></tr>')
    return ('<table class="summary"><thead><tr><th>stage</th><th>chain</th><th>inputs (stage &lt;- inputs)</th>'
            '<th>state</th><th>wall s</th><th>fingerprint</th><th>key metrics</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def metrics_table(metrics: dict, per_column: int = 14) -> str:
    """Return the metrics as tables side by side (`per_column` rows each), values exact."""
    if not metrics:
        return '<p class="dim">no metrics recorded</p>'
    rows = [f'<tr data-metric="{esc(k)}"><th>{esc(k)}</th><td class="metric-value">{format_value(v)}</td></tr>'
            for k, v in metrics.items()]
    columns = max(1, min(3, math.ceil(len(rows) / per_column)))
    size = math.ceil(len(rows) / columns)
    return '<div class="metrics">' + "".join(
        '<table class="metrics"><tbody>' + "".join(rows[i:i + size]) + "</tbody></table>"
        for i in range(0, len(rows), size)) + "</div>"


def lineage_html(view: StageView, by_name: dict[str, StageView]) -> str:
    """Return the stage's outputs (role, path, sha256, size, consumers) and the upstream fingerprints it read."""
    manifest = view.manifest or {}
    consumers = [v for v in by_name.values() if view.name in v.inputs]
    fp = manifest.get("fingerprint")
    parts = []
    outputs = manifest.get("outputs", {})
    if outputs:
        rows = []
        for role, out in outputs.items():
            out = out if isinstance(out, dict) else {}
            sha = str(out.get("sha256", ""))
            rows.append(f'<tr id="out-{esc(slug(view.name))}-{esc(slug(role))}" data-role="{esc(role)}">'
                        f'<td>{esc(role)}</td><td class="mono">{esc(view.name)}/{esc(out.get("path", ""))}</td>'
                        f'<td class="mono" title="{esc(sha)}">{esc(sha[:16])}</td>'
                        f'<td class="num">{esc(human_bytes(out.get("bytes")))}</td>'
                        f'<td class="num">{esc(out.get("files", ""))}</td></tr>')
        parts.append('<table class="outputs"><caption>outputs</caption><thead><tr><th>output role</th><th>path</th><th>sha256</th>'
                     '<th>size</th><th>files</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")
    if manifest and consumers:
        read_by = []
        for c in consumers:
            consumed = ((c.manifest or {}).get("inputs") or {}).get(view.name)
            mark = ('<span class="ok">this output</span>' if consumed and consumed == fp else
                    '<span class="warn">another version of it</span>' if consumed else '<span class="dim">not yet</span>')
            read_by.append(f'<a href="#stage-{esc(slug(c.name))}">{esc(c.name)}</a> ({mark})')
        parts.append(f'<p class="readby">Read by: {", ".join(read_by)}</p>')
    recorded = (view.record or {}).get("inputs") or manifest.get("inputs") or {}
    if view.inputs:
        rows = []
        for up in view.inputs:
            consumed = recorded.get(up, "")
            current = str(((by_name[up].manifest or {}) if up in by_name else {}).get("fingerprint", ""))
            if not consumed:
                match = '<span class="dim">–</span>'
            elif consumed == current:
                match = '<span class="ok">same as its output now</span>'
            else:
                match = f'<span class="warn">its output now: {esc(current or "none")}</span>'
            roles = ((by_name[up].manifest or {}).get("outputs", {}) if up in by_name else {})
            links = ", ".join(f'<a href="#out-{esc(slug(up))}-{esc(slug(r))}">{esc(r)}</a>' for r in roles) or "–"
            rows.append(f'<tr data-input="{esc(up)}"><td><a href="#stage-{esc(slug(up))}">{esc(up)}</a></td>'
                        f'<td class="mono">{esc(consumed or "–")}</td><td>{match}</td><td>{links}</td></tr>')
        parts.append('<table class="inputs"><caption>inputs</caption><thead><tr><th>input stage</th><th>fingerprint consumed</th>'
                     '<th>upstream now</th><th>its outputs</th></tr></thead><tbody>' + "".join(rows)
                     + "</tbody></table>")
    return "".join(parts) or '<p class="dim">no outputs and no inputs</p>'


def stage_section(run_dir: Path, view: StageView, by_name: dict[str, StageView], budget: ImageBudget) -> str:
    parts = [f'<section class="stage" id="stage-{esc(slug(view.name))}" data-stage="{esc(view.name)}" '
             f'data-state="{esc(view.state)}"><h2>{esc(view.name)} {state_badge(view.state)}</h2>']
    record = view.record or {}
    facts = [f"chain {esc(view.chain)}"]
    if view.fingerprint:
        facts.append(f'fingerprint <span class="mono">{esc(view.fingerprint)}</span>')
    if view.wall_time_s is not None:
        facts.append(f"wall time {view.wall_time_s:.1f} s")
    for key in ("world_size", "finished_at"):
        if key in record:
            facts.append(f"{esc(key.replace('_', ' '))} {esc(record[key])}")
    if record.get("resumed"):
        facts.append("resumed from its work directory")
    parts.append(f'<p class="dim">{" · ".join(facts)}</p>')
    manifest = view.manifest
    if view.state == "not run":
        parts.append("<p>Not run: no output in this run directory yet.</p>")
    if view.state == "stale":
        parts.append('<p class="warn">Stale: this output was made from other settings or inputs than the run\'s '
                     'current ones (the stage would run again).</p>')
    if view.failure:
        failure = view.failure
        parts.append(f'<h3>failure</h3><pre class="error">{esc(failure.get("error", ""))}</pre>')
        if failure.get("ranks"):
            parts.append("<p>failed ranks: " + ", ".join(f"{esc(r)}: {esc(e)}" for r, e in failure["ranks"].items())
                         + "</p>")
        if failure.get("traceback"):
            parts.append(f'<details><summary>traceback</summary><pre>{esc(failure["traceback"])}</pre></details>')
        if manifest:
            parts.append(f'<p class="dim">Below: the last completed output, kept in place (fingerprint '
                         f'<span class="mono">{esc(manifest.get("fingerprint", ""))}</span>).</p>')
    if manifest:
        parts.append("<h3>metrics</h3>" + metrics_table(manifest.get("metrics") or {}))
        charts = stage_charts(run_dir, view)
        images = stage_images(run_dir, view, budget)
        curves = [i for i in images if "curve" in i.label]
        if charts or curves:
            parts.append('<h3>curves</h3><div class="charts">' + "".join(svg_chart(c) for c in charts)
                         + "".join(img_tag(i, run_dir) for i in curves) + "</div>")
        samples = stage_samples(run_dir, view)
        if samples:
            parts.append("<h3>sample generations</h3>" + samples_table(samples))
        others = [i for i in images if "curve" not in i.label]
        if others:
            parts.append('<h3>images</h3><div class="images">' + "".join(img_tag(i, run_dir) for i in others)
                         + "</div>")
    parts.append("<h3>lineage</h3>" + lineage_html(view, by_name))
    shown = manifest or record
    if shown.get("config") is not None:
        parts.append('<details><summary>config</summary><pre>'
                     f'{esc(json.dumps(shown.get("config"), indent=1, default=str))}</pre></details>')
    if shown.get("versions"):
        versions = ", ".join(f"{esc(k)} {esc(v)}" for k, v in shown["versions"].items())
        parts.append(f'<details><summary>library versions</summary><p class="mono">{versions}</p></details>')
    parts.append("</section>")
    return "".join(parts)


def render(run_dir: Path, views: list[StageView], run_config: dict | None = None) -> str:
    """Return the report page of `views` (the stages of `run_dir`) as one HTML document."""
    by_name = {v.name: v for v in views}
    budget = ImageBudget()
    counts: dict[str, int] = {}
    for view in views:
        counts[view.state] = counts.get(view.state, 0) + 1
    summary = ", ".join(f"{n} {esc(s)}" for s, n in counts.items())
    saved = ""
    if run_config:
        saved = (f' · config {esc(run_config.get("config", ""))}, chain {esc(run_config.get("chain", ""))}'
                 + (f', overrides <span class="mono">{esc(" ".join(map(str, run_config.get("overrides") or [])))}'
                    "</span>" if run_config.get("overrides") else ""))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = "".join(stage_section(run_dir, v, by_name, budget) for v in views)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>aigc report: {esc(run_dir)}</title><style>{STYLE}</style></head><body>"
        f'<header><h1>aigc run report</h1><div class="meta">run directory <span class="mono">{esc(run_dir)}</span>'
        f"{saved} · {len(views)} stages: {summary} · generated {generated}</div></header><main>"
        "<h2>stage graph</h2>" + svg_graph(views)
        + "<h2>stages</h2>" + summary_table(views) + body + "</main></body></html>\n"
    )


def write_report(run_dir: Path, output: Path, names: list[str], fingerprints: dict[str, str],
                 run_config: dict | None = None) -> Path:
    """Write the report of `run_dir` (stages `names`) to `output` atomically; return `output`."""
    text = render(run_dir, collect(run_dir, names, fingerprints), run_config)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    return output


# ---------------------------------------------------------------- serving


def make_server(page: Path, port: int) -> ThreadingHTTPServer:
    """Return an HTTP server on 127.0.0.1:`port` (0: any free port) answering GET / with the page's bytes."""
    body = page.read_bytes()
    paths = {"/", "/" + page.name}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            if self.path.split("?", 1)[0] not in paths:
                self.send_error(404, "only the report is served here")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(False)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the URL is printed once
            pass

    return ThreadingHTTPServer((SERVE_HOST, port), Handler)


def serve(page: Path, port: int, announce: Any = print) -> None:
    """Serve `page` on 127.0.0.1:`port` until Ctrl-C or SIGTERM; `announce` gets the URL line."""
    server = make_server(page, port)
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        announce(f"Serving {page} at http://{SERVE_HOST}:{server.server_address[1]}/ (Ctrl-C to stop)")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)

