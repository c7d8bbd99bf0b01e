"""The status page: one HTML document, drawn on the server.

Everything shown from the queue came from outside -- a sender address is
what a client wrote after ``MAIL FROM:``, an error is what a remote
server replied, a destination is a domain a client named -- so every
value goes through :func:`html.escape` (quotes too, for attributes) on its
way into the page, and the page has no script at all: it reloads itself
with a ``<meta http-equiv="refresh">``.  The chart is an inline SVG with
one ``<rect>`` per minute.
"""

import dataclasses
import html
import time

#: The chart's size in pixels.
_BAR_WIDTH, _GAP, _HEIGHT = 10, 2, 120


@dataclasses.dataclass
class Snapshot:
    """What one page shows."""

    generated_at: float             # epoch seconds
    refresh: float                  # seconds until the browser reloads
    queue: dict                     # state -> count
    oldest: list                    # dicts: id, where, sender, age, last_error
    per_minute: list                # deliveries, oldest minute first
    last_errors: list               # (destination, epoch seconds, text)
    workers: list                   # (name, role, pid, uptime seconds)
    version: str


def _e(value):
    return html.escape(str(value), quote=True)


def duration(seconds):
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``."""
    seconds = int(seconds)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit} {seconds % size // smaller_size}{smaller}"
    return f"{seconds}s"


def _stamp(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}Z"


def chart(per_minute):
    """The SVG bar chart of deliveries per minute."""
    top = max(per_minute + [1])
    width = len(per_minute) * (_BAR_WIDTH + _GAP)
    bars = []
    for index, count in enumerate(per_minute):
        height = round(count / top * (_HEIGHT - 14))
        minutes_ago = len(per_minute) - 1 - index
        when = "this minute" if minutes_ago == 0 else f"{minutes_ago} min ago"
        bars.append(
            f'<rect class="bar" x="{index * (_BAR_WIDTH + _GAP)}" y="{_HEIGHT - height}" '
            f'width="{_BAR_WIDTH}" height="{height}" data-count="{count}">'
            f'<title>{count} delivered, {when}</title></rect>')
    return (f'<svg id="deliveries" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{_HEIGHT}" viewBox="0 0 {width} {_HEIGHT}" role="img" '
            f'aria-label="deliveries per minute, last hour">'
            f'<text x="0" y="10" font-size="10">max {top}/min</text>{"".join(bars)}</svg>')


def _table(headers, rows, empty, table_id):
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    if not rows:
        return f'<p id="{table_id}" class="empty">{_e(empty)}</p>'
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def render(snapshot):
    """The page, as UTF-8 bytes."""
    now = snapshot.generated_at
    queue = snapshot.queue
    queue_rows = [(state, queue.get(state, 0)) for state in ("active", "deferred", "hold")]
    oldest_rows = [(m["id"], m["where"], f"<{m['sender']}>", duration(m["age"]),
                    m["last_error"] or "") for m in snapshot.oldest]
    error_rows = [(destination, duration(now - when) + " ago", text)
                  for destination, when, text in snapshot.last_errors]
    worker_rows = [(name, role, pid, duration(uptime))
                   for name, role, pid, uptime in snapshot.workers]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{_e(int(snapshot.refresh))}">
<title>relaymail status</title>
<style>
body {{ font-family: sans-serif; margin: 1em 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
rect.bar {{ fill: #4a7; }}
</style></head>
<body>
<h1>relaymail {_e(snapshot.version)}</h1>
<p>Generated <span id="generated">{_e(_stamp(now))}</span>; reloads every
{_e(int(snapshot.refresh))} s.  <a href="/metrics">Prometheus metrics</a></p>
<h2>Queue</h2>
{_table(("state", "messages"), queue_rows, "", "queue")}
<h2>Deliveries per minute, last hour</h2>
{chart(snapshot.per_minute)}
<h2>Oldest messages</h2>
{_table(("id", "in", "sender", "age", "last error"), oldest_rows, "The queue is empty.", "oldest")}
<h2>Last error per destination</h2>
{_table(("destination", "when", "error"), error_rows, "No delivery has failed.", "errors")}
<h2>Processes</h2>
{_table(("name", "role", "pid", "uptime"), worker_rows, "", "workers")}
</body></html>
"""
    return page.encode("utf-8")
