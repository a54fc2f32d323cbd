"""report.html: one self-contained summary page of a trial (figures inlined as data URIs, no external resources).

Self-contained so that it can be mailed, attached to an issue or opened from a device bench with no network
and no web server: every figure is a base64 PNG and the style sheet is inline.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.pass { color: #176317; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def write_html(report: dict[str, Any], *, figures: list[Path], path: Path) -> None:
    """Render the page for `report` with `figures` (PNG files) embedded, and write it to `path`."""
    path.write_text(render_html(report, figures=figures))


def render_html(report: dict[str, Any], *, figures: list[Path]) -> str:
    """The page as a string: summary, invariants (when checked), figures, per-device table, fault events."""
    title = f"FedCache trial: {report['algorithm']} on {report['dataset']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _summary(report),
        _invariants(report),
        "<h2>Figures</h2>",
        *(_figure(p) for p in figures),
        "<h2>Devices</h2>",
        _devices(report),
        _events(report),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], *, text_columns: int = 1) -> str:
    def cell(tag: str, n: int, value: Any) -> str:
        cls = ' class="text"' if n < text_columns else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", n, h) for n, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", n, v) for n, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def _summary(report: dict[str, Any]) -> str:
    per = report.get("bytes_per_device_per_epoch", {})
    rows = [
        ["algorithm", report["algorithm"]],
        ["dataset", report["dataset"]],
        ["devices", len(report["devices"])],
        ["epochs", report.get("epochs", "")],
        ["final MAUA", f"{report['maua']:.4f}"],
        ["registration up (all devices)", _kib(report["bytes"]["register_up"])],
        ["uplink (all devices)", _kib(report["bytes"]["up"])],
        ["downlink (all devices)", _kib(report["bytes"]["down"])],
        ["up / device / epoch", _kib(per.get("up", 0))],
        ["down / device / epoch", _kib(per.get("down", 0))],
        ["wall", f"{report.get('wall_s', 0):.0f} s"],
    ]
    if "late_joiners" in report:
        rows.append(["late joiners (start after s)", ", ".join(f"{d}: {s}" for d, s in report["late_joiners"].items())])
    if "faults" in report:
        rows.append(["fault mode", report["faults"]["mode"]])
        rows.append(["fault events", len(report["faults"]["events"])])
    return "<h2>Summary</h2>" + _table(["", "value"], rows, text_columns=2)


def _invariants(report: dict[str, Any]) -> str:
    invariants = report.get("invariants")
    if not invariants:
        return ""
    rows = []
    for name, result in invariants.items():
        verdict = "PASS" if result["ok"] else "FAIL"
        rows.append(
            f'<tr><td class="text {verdict.lower()}">{verdict}</td><td class="text">{_e(name)}</td>'
            f'<td class="text">{_e(result["detail"])}</td></tr>'
        )
    overall = "PASS" if all(r["ok"] for r in invariants.values()) else "FAIL"
    return (
        f'<h2>Invariants: <span class="{overall.lower()}">{overall}</span></h2>'
        '<table><thead><tr><th class="text">result</th><th class="text">invariant</th>'
        f'<th class="text">detail</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
        f"<figcaption>{_e(path.name)}</figcaption></figure>"
    )


def _devices(report: dict[str, Any]) -> str:
    late = report.get("late_joiners", {})
    headers = ["device", "arch", "accuracy", "epochs", "teacher coverage", "up", "down", "registration up", "p50 ms"]
    rows = [
        [
            d["id"] + (" (late)" if d["id"] in late else ""),
            d["arch"],
            f"{d['accuracy']:.4f}",
            d["epochs"],
            f"{d['teacher_coverage']:.2f}",
            _kib(d["bytes_up"]),
            _kib(d["bytes_down"]),
            _kib(d["bytes_register_up"]),
            "" if d.get("latency_ms_p50") is None else f"{d['latency_ms_p50']:.1f}",
        ]
        for d in report["devices"]
    ]
    return _table(headers, rows, text_columns=2)


def _events(report: dict[str, Any]) -> str:
    events = report.get("faults", {}).get("events", [])
    if not events:
        return ""
    rows = [
        ["" if e["t"] is None else f"{e['t']:.1f}", e["event"], "" if "device" not in e else f"dev{e['device']:03d}"]
        for e in events
    ]
    return "<h2>Fault events</h2>" + _table(["trial time s", "event", "device"], rows, text_columns=3)


def write_comparison_html(
    *,
    path: Path,
    title: str,
    intro: str,
    summary: tuple[list[str], list[list[Any]]],
    figures: list[Path],
    devices: tuple[list[str], list[list[Any]]],
    startup: tuple[list[str], list[list[Any]]],
    links: dict[str, str],
) -> Path:
    """One self-contained page comparing trials (the demo's FedCache and local runs) side by side.

    `summary`, `devices` and `startup` are (headers, rows) tables; `figures` PNG files inlined like a trial
    page's; `links` label -> relative URL of each trial's own report.html.
    """
    link_items = "".join(f'<li><a href="{_e(url)}">{_e(label)}</a></li>' for label, url in links.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(intro)}</p>",
        "<h2>Summary</h2>",
        _table(*summary),
        "<h2>Figures</h2>",
        *(_figure(p) for p in figures),
        "<h2>Devices</h2>",
        _table(*devices, text_columns=2),
        "<h2>Start-up (seconds per device: median / slowest)</h2>",
        _table(*startup),
        f"<h2>Each trial's own report</h2><ul>{link_items}</ul>" if links else "",
        "</body></html>",
    ]
    path.write_text("\n".join(p for p in parts if p))
    return path


def kib(value: float) -> str:
    """Bytes as KiB with one decimal, as the pages show them."""
    return _kib(value)
