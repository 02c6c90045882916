"""Plots drawn on the server as SVG: nothing to load from outside (a site's network reaches no
CDN), they render in any browser and without JavaScript, and every bar or cell is a link that
drills down (the same URL scheme as the pages).

Each function returns one ``<svg class="plot">`` string; the data comes from the views' SQL
aggregates. Values are escaped; colours per job state are fixed across plots.
"""
from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Sequence

STATE_COLOURS = {"defined": "#9e9e9e", "assigned": "#8d6e63", "activated": "#42a5f5",
                 "throttled": "#b39ddb",
                 "sent": "#26c6da", "starting": "#26a69a", "running": "#47d147",
                 "holding": "#ffb300", "transferring": "#ff7043", "finished": "#165616",
                 "failed": "#e00000", "cancelled": "#616161", "closed": "#bdbdbd"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
W, H = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 28, 44


def colour(name: str, i: int) -> str:
    return STATE_COLOURS.get(name) or PALETTE[i % len(PALETTE)]


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _svg(title: str, body: list[str], width: int = W, height: int = H, name: str = "") -> str:
    return (f'<svg class="plot" data-plot="{_e(name)}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<title>{_e(title)}</title>'
            f'<text x="{LEFT}" y="16" class="plot-title">{_e(title)}</text>'
            + "".join(body) + "</svg>")


def _link(href: str | None, inner: str) -> str:
    return f'<a href="{_e(href)}">{inner}</a>' if href else inner


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _y_axis(ymax: float, plot_h: int, label: str) -> list[str]:
    out = []
    for i in range(5):
        v = ymax * i / 4
        y = TOP + plot_h - plot_h * i / 4
        text = f"{v:g}" if v < 1000 else f"{v / 1000:g}k"
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'class="grid"/><text x="{LEFT - 4}" y="{y + 4:.1f}" '
                   f'text-anchor="end" class="tick">{text}</text>')
    if label:
        out.append(f'<text x="12" y="{TOP + plot_h / 2:.0f}" class="axis" '
                   f'transform="rotate(-90 12 {TOP + plot_h / 2:.0f})" '
                   f'text-anchor="middle">{_e(label)}</text>')
    return out


def _legend(names: Sequence[str], links: Callable[[str], str | None] | None = None) -> list[str]:
    out = []
    for i, name in enumerate(names[:14]):
        y = TOP + 14 * i
        item = (f'<rect x="{W - RIGHT + 10}" y="{y}" width="10" height="10" '
                f'fill="{colour(name, i)}"/><text x="{W - RIGHT + 24}" y="{y + 9}" '
                f'class="legend">{_e(name)[:22]}</text>')
        out.append(_link(links(name) if links else None, item))
    return out


def _x_label(value) -> str:
    if isinstance(value, dt.datetime):
        return f"{value:%m-%d %H:%M}" if value.hour or value.minute else f"{value:%Y-%m-%d}"
    return str(value)


def stacked_bars(title: str, xs: Sequence, series: dict[str, Sequence[float]], *,
                 link: Callable[[str, int], str | None] | None = None,
                 legend_link: Callable[[str], str | None] | None = None, ylabel: str = "jobs",
                 name: str = "") -> str:
    """Bars per x (a time bucket or a label), stacked by series; empty data says so."""
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    if not xs or not series:
        return _svg(title, [f'<text x="{LEFT}" y="{TOP + 40}" class="empty">no data in this '
                            'selection</text>'], name=name)
    totals = [sum(s[i] for s in series.values()) for i in range(len(xs))]
    ymax = _nice_max(max(totals))
    bar_w = plot_w / len(xs)
    body = _y_axis(ymax, plot_h, ylabel)
    for i, x in enumerate(xs):
        base = 0.0
        for j, (sname, values) in enumerate(series.items()):
            v = values[i]
            if not v:
                continue
            h = plot_h * v / ymax
            y = TOP + plot_h - plot_h * (base + v) / ymax
            rect = (f'<rect class="bar" x="{LEFT + i * bar_w + 1:.1f}" y="{y:.1f}" '
                    f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="{colour(sname, j)}">'
                    f'<title>{_e(_x_label(x))} {_e(sname)}: {v:g}</title></rect>')
            body.append(_link(link(sname, i) if link else None, rect))
            base += v
    step = max(1, len(xs) // 6)
    for i in range(0, len(xs), step):
        body.append(f'<text x="{LEFT + (i + 0.5) * bar_w:.1f}" y="{H - BOTTOM + 14}" '
                    f'text-anchor="middle" class="tick">{_e(_x_label(xs[i]))[:20]}</text>')
    body += _legend(list(series), legend_link)
    return _svg(title, body, name=name)


def lines(title: str, xs: Sequence[dt.datetime], series: dict[str, Sequence[float]], *,
          ylabel: str = "jobs", legend_link: Callable[[str], str | None] | None = None,
          name: str = "") -> str:
    """One polyline per series over time (the operations history)."""
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    if len(xs) < 1 or not series:
        return _svg(title, [f'<text x="{LEFT}" y="{TOP + 40}" class="empty">no snapshots in '
                            'this window yet</text>'], name=name)
    ymax = _nice_max(max(max(v) for v in series.values()))
    t0, t1 = xs[0], xs[-1]
    span = max((t1 - t0).total_seconds(), 1.0)
    body = _y_axis(ymax, plot_h, ylabel)

    def px(t: dt.datetime) -> float:
        return LEFT + plot_w * (t - t0).total_seconds() / span if len(xs) > 1 else LEFT

    for j, (sname, values) in enumerate(series.items()):
        pts = " ".join(f"{px(t):.1f},{TOP + plot_h - plot_h * v / ymax:.1f}"
                       for t, v in zip(xs, values))
        body.append(f'<polyline class="line" fill="none" stroke="{colour(sname, j)}" '
                    f'stroke-width="2" points="{pts}"><title>{_e(sname)}</title></polyline>')
        for t, v in zip(xs, values):
            body.append(f'<circle cx="{px(t):.1f}" cy="{TOP + plot_h - plot_h * v / ymax:.1f}" '
                        f'r="2" fill="{colour(sname, j)}"><title>{_e(_x_label(t))} '
                        f'{_e(sname)}: {v:g}</title></circle>')
    for t in (t0, t1):
        body.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle" '
                    f'class="tick">{_e(_x_label(t))}</text>')
    body += _legend(list(series), legend_link)
    return _svg(title, body, name=name)


def histogram(title: str, edges: Sequence[float], counts: Sequence[int], *, xlabel: str,
              name: str = "") -> str:
    """Bars over value bins: ``edges`` has one more entry than ``counts``."""
    labels = [f"{edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(len(counts))]
    svg = stacked_bars(title, labels, {xlabel: list(counts)} if counts else {}, name=name)
    return svg


def heat_map(title: str, rows: Sequence[str], cols: Sequence[str],
             values: dict[tuple[str, str], int], *,
             link: Callable[[str, str], str | None] | None = None, name: str = "") -> str:
    """A grid of rows x columns, each cell's shade by its count (log scale), each a link."""
    cell_w, cell_h, left, top = 48, 18, 150, 60
    width = left + cell_w * len(cols) + 20
    height = top + cell_h * max(len(rows), 1) + 20
    if not rows:
        return _svg(title, [f'<text x="{LEFT}" y="{TOP + 40}" class="empty">no sites</text>'],
                    width=max(width, 300), height=120, name=name)
    vmax = max([v for v in values.values() if v] or [1])
    body = []
    for j, col in enumerate(cols):
        x = left + j * cell_w + cell_w / 2
        body.append(f'<text x="{x:.0f}" y="{top - 6}" text-anchor="start" class="tick" '
                    f'transform="rotate(-40 {x:.0f} {top - 6})">{_e(col)}</text>')
    for i, row in enumerate(rows):
        y = top + i * cell_h
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" '
                    f'class="tick">{_e(row)[:24]}</text>')
        for j, col in enumerate(cols):
            v = values.get((row, col), 0)
            shade = math.log1p(v) / math.log1p(vmax) if v else 0.0
            fill = f"rgba(200,30,30,{0.08 + 0.85 * shade:.2f})" if col == "failed" and v else \
                f"rgba(30,90,200,{0.08 + 0.85 * shade:.2f})" if v else "#f4f4f4"
            cell = (f'<rect class="cell" x="{left + j * cell_w}" y="{y}" width="{cell_w - 1}" '
                    f'height="{cell_h - 1}" fill="{fill}"><title>{_e(row)} {_e(col)}: {v}'
                    f'</title></rect><text x="{left + j * cell_w + cell_w / 2:.0f}" '
                    f'y="{y + 13}" text-anchor="middle" class="cellv">{v or ""}</text>')
            body.append(_link(link(row, col) if (link and v) else None, cell))
    return _svg(title, body, width=width, height=height, name=name)


def bins(values: Sequence[float], n: int = 20) -> tuple[list[float], list[int]]:
    """Equal-width bins over ``values`` (edges, counts)."""
    if not values:
        return [], []
    lo, hi = min(values), max(values)
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / n
    counts = [0] * n
    for v in values:
        counts[min(int((v - lo) / width), n - 1)] += 1
    return [lo + i * width for i in range(n + 1)], counts
