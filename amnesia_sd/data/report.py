"""The report of `amnesia-sd eval`: report.json, a self-contained report.html, a terminal table."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from amnesia_sd.core.io import write_json, write_text

REPORT_JSON = "report.json"  # written last: its presence marks a finished report
REPORT_HTML = "report.html"
DEMO_KEYS = ("p_forgotten", "p_forgotten_heldout", "entropy_forgotten", "acc_retained")


def _similarity_measure(report: dict) -> str:
    """CLIP image similarity when CLIP ran (closer to what people see), else SSIM."""
    return "clip_image" if "clip_image" in report["similarity_measures"] else "ssim"


def summary_rows(report: dict) -> list[dict]:
    """The headline numbers: per prompt set, each loaded detector's headline metrics for both
    models, then how similar the forgotten model's images are to the base's."""
    rows = []
    measure = _similarity_measure(report)
    for name, entry in report["sets"].items():
        metrics = entry["metrics"]
        for detector, status in report["detectors"].items():
            for metric in status.get("headline", []):
                values = [metrics[role].get(detector, {}).get(metric) for role in ("base", "forgotten")]
                if any(v is not None for v in values):
                    rows.append({"set": name, "metric": f"{detector} {metric}", "base": values[0],
                                 "forgotten": values[1]})
        rows.append({"set": name, "metric": f"similarity to base ({measure})", "base": None,
                     "forgotten": metrics["similarity"][measure]})
    if "neighbors" in report:
        rows += _neighbor_rows(report["neighbors"], measure)
    return rows


def _neighbor_rows(neighbors: dict, measure: str) -> list[dict]:
    """Over the neighbours: how often the judge sees them in each model's images, the pinpoint
    score (the share kept, which only the forgotten model has) and the similarity to the base."""
    rows = []
    if neighbors["judge"]:
        rows.append({"set": "neighbors", "metric": f"{neighbors['judge']} shows the neighbour",
                     "base": neighbors["base_rate"], "forgotten": neighbors["forgotten_rate"]})
        rows.append({"set": "neighbors", "metric": "pinpoint (share kept)", "base": None,
                     "forgotten": neighbors["pinpoint"]})
    rows.append({"set": "neighbors", "metric": f"similarity to base ({measure})", "base": None,
                 "forgotten": neighbors["similarity"][measure]})
    return rows


def pinpoint_line(neighbors: dict) -> str:
    """'pinpoint 0.83 over 13 neighbours (...)': the summary's line about the neighbours."""
    entries = neighbors["per_neighbor"]
    total = f"{len(entries)} neighbour{'s' * (len(entries) != 1)}"
    if neighbors["pinpoint"] is None:
        why = ("no judge: the clip detector was not loaded" if not neighbors["judge"] else
               "the base shows none of them")
        return f"pinpoint: none over {total} ({why}); similarity to base in the table"
    counted = sum(e["kept"] is not None for e in entries.values())
    over = (total if counted == len(entries) else
            f"{counted} of {total} (the base shows the others in none of its images)")
    return (f"pinpoint {fmt(neighbors['pinpoint'])} over {over} ({neighbors['judge']} judge): the share of the base's "
            "images of a neighbour whose forgotten image on the same seed shows it too")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def _change(base, forgotten) -> str:
    if base is None or forgotten is None or isinstance(base, bool):
        return ""
    return f"{forgotten - base:+.3f}" if abs(forgotten - base) < 10 else f"{forgotten - base:+.2f}"


def _not_loaded(report: dict) -> list[str]:
    return [f"{name} detector not loaded ({s['model']}: {s['reason']}); {s['fix']}"
            for name, s in report["detectors"].items() if not s.get("loaded")]


def concept_title(report: dict) -> str:
    """What was forgotten, short enough for a title (the demo records every phrasing of its digit)."""
    if "digits" in report:
        forgotten = report["digits"]["forgotten_digits"]
        return f"digit{'s' * (len(forgotten) > 1)} {', '.join(map(str, forgotten))}"
    text = ", ".join(report["concepts"])
    return text if len(text) <= 80 else text[:77] + "..."


def _headline(report: dict) -> str:
    s = report["settings"]
    unit = "per digit" if "digits" in report else "per prompt set"
    return (f"{s['num_images']} images {unit}, seed {s['seed']}, {s['num_inference_steps']} steps of "
            f"{s['scheduler'].removesuffix('Scheduler')}, guidance "
            f"{s['guidance_scale']}, {s['resolution']} px; detector: {report['detector']}")


def format_summary(report: dict) -> str:
    """One screen: the summary rows, the demo's numbers for the digits model, warnings."""
    models = report["models"]
    lines = [f"amnesia-sd eval of {concept_title(report)!r}: {models['forgotten']['spec']} "
             f"against base {models['base']['spec']}", _headline(report), ""]
    lines.append(f"{'set':<12} {'metric':<36} {'base':>9} {'forgotten':>10} {'change':>8}")
    for row in report["summary"]:
        lines.append(f"{row['set']:<12} {row['metric']:<36} {fmt(row['base']):>9} {fmt(row['forgotten']):>10} "
                     f"{_change(row['base'], row['forgotten']):>8}")
    if "digits" in report:
        lines += ["", f"{'model':<12}" + "".join(f"{k:>22}" for k in DEMO_KEYS)]
        for role in ("base", "forgotten"):
            lines.append(f"{role:<12}" + "".join(f"{report['digits'][role][k]:>22.3f}" for k in DEMO_KEYS))
    if "neighbors" in report:
        lines += ["", f"{'neighbour':<28} {'base':>9} {'forgotten':>10} {'kept':>8} {'similarity':>11}"]
        measure = _similarity_measure(report)
        for name, e in report["neighbors"]["per_neighbor"].items():
            lines.append(f"{name[:28]:<28} {fmt(e['base_rate']):>9} {fmt(e['forgotten_rate']):>10} "
                         f"{fmt(e['kept']):>8} {fmt(e['similarity'][measure]):>11}")
        lines.append(pinpoint_line(report["neighbors"]))
    lines += [f"warning: {w}" for w in _not_loaded(report)]
    return "\n".join(lines)


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.meta { color: #555; margin: 2px 0; } code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.warn { background: #fff4e5; border: 1px solid #f0b35a; padding: 8px 12px; border-radius: 6px; margin: 12px 0; }
table.metrics { border-collapse: collapse; margin: 8px 0; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
table.metrics th { background: #f5f5f7; } table.metrics td.l, table.metrics th.l { text-align: left; }
.down { color: #0a7d28; } .up { color: #b3261e; }
.pairs { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 10px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; background: #fafafa; }
.pair { display: flex; gap: 4px; } .pair div { text-align: center; font-size: 11px; color: #555; }
.pair img { display: block; border: 1px solid #ccc; background: #fff; }
figcaption { font-size: 12px; overflow-wrap: anywhere; margin-top: 4px; }
.small img { image-rendering: pixelated; }
"""


def _image_note(record: dict) -> str:
    """A few numbers under an image: what each detector said about it."""
    notes = []
    if "digits" in record:
        notes.append(f"reads {record['digits']['predicted']}, p={record['digits']['p_forgotten']:.2f}")
    if "nudenet" in record:
        notes.append(f"exposed {sum(record['nudenet']['exposed'].values())}")
    if "clip" in record:
        notes.append(f"p={record['clip']['p_concept']:.2f}, cs={record['clip']['clip_score']:.1f}")
    if "neighbor" in record:
        verdict = record["neighbor"]
        notes.append(f"{'shows' if verdict['shows'] else 'not'} the neighbour, p={verdict['p']:.2f}")
    return "; ".join(notes)


def _metrics_table(entry: dict) -> str:
    rows = []
    base, forgotten = entry["metrics"]["base"], entry["metrics"]["forgotten"]
    for detector, values in base.items():
        for metric, value in values.items():
            other = forgotten[detector].get(metric)
            rows.append(f"<tr><td class=l>{escape(detector)} {escape(metric)}</td><td>{fmt(value)}</td>"
                        f"<td>{fmt(other)}</td><td>{_change(value, other)}</td></tr>")
    for measure, value in entry["metrics"]["similarity"].items():
        rows.append(f"<tr><td class=l>similarity to base ({escape(measure)})</td><td>-</td><td>{fmt(value)}</td>"
                    "<td></td></tr>")
    return ("<table class=metrics><tr><th class=l>metric</th><th>base</th><th>forgotten</th><th>change</th></tr>"
            + "".join(rows) + "</table>")


def _pairs(entry: dict, size: int, measure: str) -> str:
    figures = []
    for image in entry["images"]:
        cells = "".join(
            f"<div><img src=\"{escape(image[role]['image'])}\" width={size} height={size} loading=lazy "
            f"alt=\"{role} image {image['index']}\">{role}<br>{escape(_image_note(image[role]))}</div>"
            for role in ("base", "forgotten"))
        figures.append(
            f"<figure style=\"width:{2 * size + 10}px\"><div class=pair>{cells}</div><figcaption>"
            f"#{image['index']} seed {image['seed']}, guidance {image['guidance_scale']:g}, "
            f"{measure} {fmt(image['similarity'][measure])}<br>{escape(image['prompt'])}</figcaption></figure>")
    return "<div class=pairs>" + "".join(figures) + "</div>"


def _neighbors_section(neighbors: dict, size: int, measure: str) -> str:
    """The table of every neighbour's numbers, then each one's image pairs."""
    entries = neighbors["per_neighbor"]
    measures = list(neighbors["similarity"])
    judge = neighbors["judge"] or "none (the clip detector was not loaded)"
    parts = [f"<h2 id=neighbors>neighbors</h2><p class=meta>{escape(neighbors['description'])}; "
             f"{neighbors['num_images']} images each; judge: {escape(judge)}; each pair: base (left) | forgotten "
             f"(right), same seed</p>", f"<p class=meta>{escape(pinpoint_line(neighbors))}</p>",
             "<table class=metrics><tr><th class=l>neighbour</th><th>base shows it</th><th>forgotten shows it</th>"
             "<th>kept</th>" + "".join(f"<th>similarity to base ({escape(m)})</th>" for m in measures) + "</tr>"]
    for k, (name, e) in enumerate(entries.items()):
        parts.append(f"<tr><td class=l><a href=\"#neighbor-{k + 1}\">{escape(name)}</a></td><td>{fmt(e['base_rate'])}"
                     f"</td><td>{fmt(e['forgotten_rate'])}</td><td>{fmt(e['kept'])}</td>"
                     + "".join(f"<td>{fmt(e['similarity'][m])}</td>" for m in measures) + "</tr>")
    parts.append("</table>")
    for k, (name, e) in enumerate(entries.items()):
        parts += [f"<h3 id=\"neighbor-{k + 1}\">{escape(name)}</h3>", _pairs(e, size, measure)]
    return "\n".join(parts)


def render_html(report: dict) -> str:
    """A page that needs nothing but the images beside it (relative links, inline CSS, no scripts)."""
    s, models = report["settings"], report["models"]
    size = 96 if s["resolution"] < 96 else min(s["resolution"], 224)
    measure = _similarity_measure(report)
    title = f"amnesia-sd eval: {concept_title(report)}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body class=\"{'small' if s['resolution'] < 96 else ''}\">",
             f"<h1>{escape(title)}</h1>",
             f"<p class=meta>forgotten model <code>{escape(models['forgotten']['identity'])}</code> against base "
             f"<code>{escape(models['base']['identity'])}</code></p>",
             f"<p class=meta>{escape(_headline(report))}; amnesia-sd {escape(report['tool_version'])}; every number "
             f"in <a href=\"{REPORT_JSON}\">{REPORT_JSON}</a></p>"]
    parts += [f"<div class=warn>{escape(w)}</div>" for w in _not_loaded(report)]
    parts.append("<h2>Summary</h2><table class=metrics><tr><th class=l>set</th><th class=l>metric</th><th>base</th>"
                 "<th>forgotten</th><th>change</th></tr>")
    for row in report["summary"]:
        parts.append(f"<tr><td class=l><a href=\"#{escape(row['set'])}\">{escape(row['set'])}</a></td>"
                     f"<td class=l>{escape(row['metric'])}</td><td>{fmt(row['base'])}</td>"
                     f"<td>{fmt(row['forgotten'])}</td><td>{_change(row['base'], row['forgotten'])}</td></tr>")
    parts.append("</table>")
    if "digits" in report:
        d = report["digits"]
        parts.append(f"<p class=meta>The demo's numbers ({concept_title(report)}, {d['samples_per_digit']} "
                     "samples per digit):</p><table class=metrics><tr><th class=l>model</th>"
                     + "".join(f"<th>{k}</th>" for k in DEMO_KEYS) + "</tr>")
        for role in ("base", "forgotten"):
            parts.append(f"<tr><td class=l>{role}</td>" + "".join(f"<td>{fmt(d[role][k])}</td>" for k in DEMO_KEYS)
                         + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Models</h2><table class=metrics><tr><th class=l>role</th><th class=l>model</th>"
                 "<th class=l>UNet SHA-256 (as loaded)</th></tr>")
    for role in ("base", "forgotten"):
        parts.append(f"<tr><td class=l>{role}</td><td class=l>{escape(models[role]['identity'])}</td>"
                     f"<td class=l><code>{escape(models[role].get('unet_sha256', '')[:16])}</code></td></tr>")
    parts.append("</table>")
    for name, entry in report["sets"].items():
        parts.append(f"<h2 id=\"{escape(name)}\">{escape(name)}</h2><p class=meta>{escape(entry['description'])}; "
                     f"{entry['num_images']} images; each pair: base (left) | forgotten (right), same seed</p>")
        parts.append(_metrics_table(entry))
        parts.append(_pairs(entry, size, measure))
    if "neighbors" in report:
        parts.append(_neighbors_section(report["neighbors"], size, measure))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(folder: Path, report: dict) -> None:
    write_text(folder / REPORT_HTML, render_html(report))
    write_json(folder / REPORT_JSON, report)
