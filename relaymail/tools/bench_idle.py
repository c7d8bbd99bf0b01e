"""``relaymail-bench --idle N``: what sessions that say nothing cost.

Opens N sessions that each wait for the 220 and say EHLO, then hold them
open.  With ``--pid`` it reports how much the server's resident memory (its
whole process tree) grew per held session.  While all N are held it times
``NOOPS`` NOOP commands on one more session, one after the other: the
latency a live client sees beside a crowd of idle ones.
"""

import asyncio
import time

from relaymail.tools import bench

#: NOOPs timed on the extra session while the idle ones are held: fewer
#: than the junk-command limit of relaymail and Postfix (100), past which
#: NOOP counts as an error.
NOOPS = 50

#: Connections opened at once while the crowd is built, so that the
#: server's listen backlog is not what is measured.
OPENING_AT_ONCE = 100


async def run_idle(settings, count):
    """Hold ``count`` idle sessions; return the report as a dict."""
    rss_before = bench.rss_bytes(settings.pid) if settings.pid else None
    held = []
    failures = 0
    started = time.perf_counter()
    try:
        for first in range(0, count, OPENING_AT_ONCE):
            batch = range(first, min(count, first + OPENING_AT_ONCE))
            opened = await asyncio.gather(*(bench.greet(settings.host, settings.port)
                                            for _ in batch), return_exceptions=True)
            for connection in opened:
                if isinstance(connection, BaseException):
                    failures += 1
                else:
                    held.append(connection)
        opening = time.perf_counter() - started
        # Let the server finish its work for the last ones before looking.
        await asyncio.sleep(0.5)
        rss_after = bench.rss_bytes(settings.pid) if settings.pid else None
        latencies = await _noops(settings)
    finally:
        for connection in held:
            connection.abort()
    ordered = sorted(latencies)
    result = {
        "host": settings.host, "port": settings.port, "idle_sessions": len(held),
        "refused": failures, "opening_seconds": round(opening, 3),
        "noop_ms": {"p50": _ms(ordered, 50), "p99": _ms(ordered, 99)},
    }
    if settings.pid:
        grown = rss_after - rss_before
        result["server"] = {"pid": settings.pid, "rss_before_bytes": rss_before,
                            "rss_after_bytes": rss_after,
                            "rss_per_session_bytes": round(grown / len(held)) if held else None}
    return result


async def _noops(settings):
    connection = await bench.greet(settings.host, settings.port)
    latencies = []
    try:
        for _ in range(NOOPS):
            began = time.perf_counter()
            await connection.expect("NOOP", 250)
            latencies.append(time.perf_counter() - began)
    finally:
        await connection.quit()
    return latencies


def _ms(ordered, p):
    value = bench.percentile(ordered, p)
    return None if value is None else round(value * 1000, 3)


def describe(result):
    noop = result["noop_ms"]
    lines = [f"idle        {result['idle_sessions']} sessions held after EHLO "
             f"({result['refused']} refused), opened in {result['opening_seconds']:.2f} s",
             f"NOOP        p50 {noop['p50']} ms, p99 {noop['p99']} ms on one more session "
             f"beside them"]
    server = result.get("server")
    if server:
        per = server["rss_per_session_bytes"]
        lines.append(f"server      pid {server['pid']}: RSS {server['rss_before_bytes'] / 2**20:.1f}"
                     f" -> {server['rss_after_bytes'] / 2**20:.1f} MiB, "
                     f"{'-' if per is None else f'{per / 1024:.1f} KiB'} per idle session")
    return "\n".join(lines) + "\n"
