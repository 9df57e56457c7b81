"""A run report (`clipsr.report.build_report`'s dict) as one self-contained HTML page.

A pure function of the dict: every image is embedded as a PNG ``data:`` URI (the plots are drawn
here with Pillow, from the quantiles in the dict), the style sheet is inline, and nothing is
fetched, so the file can be mailed or opened offline. Every text from the manifest (keys, domains,
errors) is escaped: keys may hold ``<`` and ``&``.
"""
from __future__ import annotations

import base64
import io
import math
from html import escape
from itertools import groupby
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;max-width:1180px;
margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#555}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border-bottom:1px solid #e4e4e4;
text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.tiles{display:flex;gap:14px;flex-wrap:wrap}.tile{border:1px solid #ddd;border-radius:6px;padding:6px 16px}
.tile b{display:block;font-size:24px}.tile.bad b{color:#b3261e}
code{font-size:12px;word-break:break-all}figure{margin:8px 0 18px}figcaption{color:#555;font-size:13px}
.samples{display:flex;gap:22px;flex-wrap:wrap}.pair{display:flex;gap:6px}
.pair img{image-rendering:pixelated;display:block;border:1px solid #ccc}.pair span{font-size:12px;color:#555}
.sample figcaption{max-width:520px}.error{color:#b3261e}
"""
_NONE = "(none)"
_PNG = "data:image/png;base64,"


def render(report: dict[str, Any]) -> str:
    """The HTML page of a report dict."""
    figures, samples = report["figures"], report["samples"]
    shown = [s for s in samples if "error" not in s]
    body = [
        f"<h1>clipsr enhance run {escape(report['run_id'])}</h1>",
        f"<p class=\"meta\">Manifest <code>{escape(report['manifest'])}</code>, "
        f"report made {escape(report['created'])}. {len(figures)} plots and {2 * len(shown)} crops embedded; "
        "the JSON record lies beside this file.</p>",
        _statuses(report),
        _groups(report["groups"]),
        _failures(report["failures"]),
        "<h2>Quality figures per domain (ok rows)</h2>",
        "".join(_figure(f) for f in figures) or "<p>No ok rows with quality figures.</p>",
        _samples(samples, report["settings"]),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>clipsr run {escape(report['run_id'])}</title><style>{_STYLE}</style></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _text(value: Any) -> str:
    return _NONE if value is None else escape(str(value))


def _statuses(report: dict[str, Any]) -> str:
    st = report["statuses"]
    not_done = st["failed"] + st.get("unsupported", 0)
    attempted = st["ok"] + not_done
    rate = f"{not_done / attempted:.2%}" if attempted else "n/a"
    tiles = [("rows", report["rows"], ""), ("ok", st["ok"], ""), ("failed", st["failed"], " bad" if st["failed"] else ""),
             ("skipped", st["skipped"], "")]
    if st.get("unsupported"):
        tiles.append(("unsupported", st["unsupported"], " bad"))
    html = "".join(f"<div class=\"tile{cls}\" id=\"status-{name}\"><b>{n}</b>{name}</div>" for name, n, cls in tiles)
    return (f"<h2>Rows</h2><div class=\"tiles\">{html}<div class=\"tile\"><b>{rate}</b>not done: (failed + "
            "unsupported) / (ok + failed + unsupported)</div></div>")


def _groups(groups: list[dict[str, Any]]) -> str:
    head = ("<tr><th>domain</th><th>model version</th><th>model id</th><th class=\"n\">ok</th>"
            "<th class=\"n\">failed</th><th class=\"n\">skipped</th><th class=\"n\">total</th></tr>")
    rows = "".join(
        f"<tr><td>{_text(g['domain'])}</td><td>{_text(g['model_version'])}</td><td><code>{_text(g['model_id'])}</code>"
        f"</td><td class=\"n\">{g['ok']}</td><td class=\"n\">{g['failed']}</td><td class=\"n\">{g['skipped']}</td>"
        f"<td class=\"n\">{g['ok'] + g['failed'] + g['skipped']}</td></tr>" for g in groups)
    return f"<h2>By domain and model</h2><table>{head}{rows}</table>"


def _failures(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return "<h2>Failures</h2><p>No failed rows.</p>"
    rows = "".join(
        f"<tr><td>{escape(f['reason'])}</td><td class=\"n\">{f['count']}</td><td>"
        + "<br>".join(f"<code>{escape(k)}</code>" for k in f["examples"]) + "</td></tr>" for f in failures)
    return ("<h2>Failures</h2><p class=\"meta\">Grouped by the error's text before its first ':'; "
            "examples are the first keys in sorted order.</p>"
            f"<table><tr><th>reason</th><th class=\"n\">rows</th><th>examples</th></tr>{rows}</table>")


def _figure(figure: dict[str, Any]) -> str:
    png = base64.b64encode(box_plot(figure["domains"])).decode("ascii")
    return (f"<figure><h3>{escape(figure['title'])} <code>{escape(figure['column'])}</code></h3>"
            f"<img src=\"{_PNG}{png}\" alt=\"{escape(figure['title'])} per domain\">"
            f"<figcaption>{escape(figure['about'])}. Box: quartiles; line: median; whiskers: 5th to 95th "
            "percentile; dots: minimum and maximum.</figcaption></figure>")


def _samples(samples: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    out = [f"<h2>Samples: bicubic | enhanced</h2><p class=\"meta\">Up to {settings['samples_per_domain']} ok rows "
           f"per domain, the same ones on every rendering of this run; crops of at most {settings['crop']} output "
           "pixels, from the most detailed part of the image, enlarged without smoothing.</p>"]
    if not samples:
        out.append("<p>No ok rows to sample.</p>")
    for domain, group in groupby(samples, key=lambda s: s["domain"]):
        out.append(f"<h3>{_text(domain)}</h3><div class=\"samples\">{''.join(_sample(s) for s in group)}</div>")
    return "".join(out)


def _sample(s: dict[str, Any]) -> str:
    what = f"<code>{escape(s['input_key'])}</code><br>model {_text(s['model_version'] or s['model_id'])}, x{s['scale']}"
    if "error" in s:
        return f"<figure class=\"sample\"><figcaption>{what}<br><span class=\"error\">{escape(s['error'])}</span></figcaption></figure>"
    x, y, w, h = s["box"]
    cw, ch = s.get("size") or (w * s["scale"], h * s["scale"])  # reports written before crops had a size
    zoom = max(1, min(4, 256 // max(cw, ch)))
    size = f"width=\"{cw * zoom}\" height=\"{ch * zoom}\""
    gain = "" if s["sharpness_gain"] is None else f", sharpness gain {s['sharpness_gain']:.2f}"
    pair = "".join(f"<div><img src=\"{_PNG}{s[name]}\" {size} alt=\"{label}\"><span>{label}</span></div>"
                   for name, label in (("bicubic_png", "bicubic"), ("enhanced_png", "enhanced")))
    return (f"<figure class=\"sample\"><div class=\"pair\">{pair}</div><figcaption>{what}{gain}; input pixels "
            f"{x},{y} to {x + w},{y + h}{f', shown {zoom}x' if zoom > 1 else ''}</figcaption></figure>")


# --- plots -----------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font bundled with Pillow
    except TypeError:
        return ImageFont.load_default()


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round axis ticks (1, 2 or 5 times a power of ten apart) from at most ``lo`` to at least ``hi``."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    digits = max(0, -math.floor(math.log10(step)))
    return [round(i * step, digits) for i in range(first, last + 1)]


def _number(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def box_plot(rows: list[dict[str, Any]], width: int = 760) -> bytes:
    """One horizontal box per domain on a shared axis, as PNG bytes."""
    font = _font(12)
    left, right, top, row_h, axis_h = 150, 170, 10, 26, 28
    height = top + row_h * len(rows) + axis_h
    lo, hi = min(r["min"] for r in rows), max(r["max"] for r in rows)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    axis = ticks(lo, hi)
    lo, hi = axis[0], axis[-1]
    plot_w = width - left - right

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    bottom = top + row_h * len(rows)
    for t in axis:
        draw.line([(px(t), top), (px(t), bottom)], fill="#e6e6e6")
        label = f"{t:g}"
        draw.text((px(t) - draw.textlength(label, font=font) / 2, bottom + 6), label, fill="#444", font=font)
    draw.line([(left, bottom), (left + plot_w, bottom)], fill="#888")
    for i, r in enumerate(rows):
        cy = top + i * row_h + row_h / 2
        name = _fit(draw, _NONE if r["domain"] is None else str(r["domain"]), font, left - 14)
        draw.text((left - 8 - draw.textlength(name, font=font), cy - 7), name, fill="#222", font=font)
        draw.line([(px(r["p05"]), cy), (px(r["p95"]), cy)], fill="#555")
        for end in ("p05", "p95"):
            draw.line([(px(r[end]), cy - 5), (px(r[end]), cy + 5)], fill="#555")
        draw.rectangle([(px(r["p25"]), cy - 7), (max(px(r["p75"]), px(r["p25"]) + 1), cy + 7)],
                       fill="#bcd4f0", outline="#2b5d9b")
        draw.line([(px(r["median"]), cy - 8), (px(r["median"]), cy + 8)], fill="#0b2f5b", width=2)
        for end in ("min", "max"):
            draw.ellipse([(px(r[end]) - 2, cy - 2), (px(r[end]) + 2, cy + 2)], fill="#555")
        note = f"n={r['n']}  median {_number(r['median'])}"
        draw.text((left + plot_w + 12, cy - 7), note, fill="#222", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
