"""relaymail-bench against the real relay and a scripted next hop, over
loopback sockets only."""

import io
import json
import socket
import sys
from unittest import mock

import pytest

from relaymail.tools import bench
from tests.relay_process import RelayProcess


def run_bench(*args):
    """Run the tool in this process with --json; return (status, report)."""
    out, err = io.StringIO(), io.StringIO()
    status = bench.main([*args, "--json"], out=out, err=err)
    assert err.getvalue() == ""
    return status, json.loads(out.getvalue())


@pytest.fixture
def relay(tmp_path):
    # Loopback is trusted by default, so b@example.net may be relayed to;
    # the next hop is a dead port, so every message stays queued in active/.
    process = RelayProcess(tmp_path, {}).start()
    yield process
    process.stop()


def queued(relay):
    return relay.queued_ids()


def assert_complete_run(status, report, relay):
    assert status == bench.EXIT_OK
    assert (report["sent"], report["errors"], report["error_replies"]) == (50, 0, {})
    assert report["timed_out"] is False
    assert len(queued(relay)) == 50
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["messages_per_second"] > 0
    server = report["server"]
    assert server["pid"] == relay.process.pid
    assert server["cpu_seconds"] > 0
    assert server["cpu_ms_per_message"] > 0
    assert server["peak_rss_bytes"] > 0


def test_connection_per_message_queues_every_message(relay):
    status, report = run_bench("--port", str(relay.port), "--messages", "50", "--sessions", "5",
                               "--pid", str(relay.process.pid))
    assert report["reuse"] is False
    assert_complete_run(status, report, relay)


def test_reuse_queues_every_message(relay):
    status, report = run_bench("--port", str(relay.port), "--messages", "50", "--sessions", "5",
                               "--reuse", "--pid", str(relay.process.pid))
    assert report["reuse"] is True
    assert_complete_run(status, report, relay)


def test_reuse_keeps_one_connection_per_session_with_rset_between(nexthop):
    status, report = run_bench("--port", str(nexthop.port), "--messages", "12", "--sessions", "3",
                               "--reuse")
    assert (status, report["sent"]) == (bench.EXIT_OK, 12)
    assert nexthop.connections == 3
    assert nexthop.commands.count("RSET") == 12 - 3
    assert nexthop.commands.count("QUIT") == 3


def test_connection_per_message_quits_after_each(nexthop):
    status, report = run_bench("--port", str(nexthop.port), "--messages", "6", "--sessions", "2")
    assert (status, report["sent"]) == (bench.EXIT_OK, 6)
    assert nexthop.connections == 6
    assert nexthop.commands.count("QUIT") == 6
    assert "RSET" not in nexthop.commands


def test_message_arrives_with_body_of_size_bytes_and_numbered_recipients(nexthop):
    status, _ = run_bench("--port", str(nexthop.port), "--messages", "1", "--size", "1000",
                          "--recipients", "3", "--from", "s@example.org", "--to", "r@example.com")
    assert status == bench.EXIT_OK
    [message] = nexthop.messages
    assert message["sender"] == "s@example.org"
    assert message["recipients"] == ["r1@example.com", "r2@example.com", "r3@example.com"]
    body = message["data"].split(b"\r\n\r\n", 1)[1]
    # The next hop has unstuffed the data: this is the body as sent.
    assert body == bench.make_body(1000)
    assert len(body) == 1000
    assert b"\r\n.x" in body


def test_dot_stuffing_doubles_every_leading_dot():
    assert bench.dot_stuff(b".a\r\nb.\r\n..c\r\n.\r\n") == b"..a\r\nb.\r\n...c\r\n..\r\n"


def test_percentiles_are_nearest_rank():
    ordered = list(range(1, 101))
    assert [bench.percentile(ordered, p) for p in (50, 95, 99)] == [50, 95, 99]
    assert bench.percentile([7], 99) == 7
    assert bench.percentile([], 50) is None


def test_rcpt_550_is_counted_as_errors_by_first_line(nexthop):
    nexthop.rcpt_reply = lambda address: (550, "5.1.1 User unknown")
    status, report = run_bench("--port", str(nexthop.port), "--messages", "10", "--sessions", "3")
    assert status == bench.EXIT_FAILED
    assert (report["sent"], report["errors"]) == (0, 10)
    assert report["error_replies"] == {"550 5.1.1 User unknown": 10}
    assert report["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert nexthop.messages == []


def test_rejected_messages_on_a_reused_connection_do_not_stop_the_rest(nexthop):
    replies = iter([(550, "5.1.1 User unknown"), (452, "4.5.3 Too many recipients")])
    nexthop.rcpt_reply = lambda address: next(replies, (250, "2.1.5 Ok"))
    status, report = run_bench("--port", str(nexthop.port), "--messages", "5", "--sessions", "1",
                               "--reuse")
    assert status == bench.EXIT_FAILED
    assert (report["sent"], report["errors"]) == (3, 2)
    assert report["error_replies"] == {"550 5.1.1 User unknown": 1,
                                       "452 4.5.3 Too many recipients": 1}
    assert nexthop.connections == 1


def test_a_server_that_never_greets_is_stopped_by_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(10)       # connections complete, but nobody answers
        status, report = run_bench("--port", str(silent.getsockname()[1]), "--messages", "3",
                                   "--sessions", "3", "--timeout", "0.5")
    assert status == bench.EXIT_FAILED
    assert report["timed_out"] is True
    assert (report["sent"], report["errors"], report["unfinished"]) == (0, 0, 3)
    assert report["seconds"] < 5


def test_chart_without_matplotlib_is_one_line_and_exit_2(monkeypatch, tmp_path):
    # As if the bench extra were not installed, whatever this venv holds.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out, err = io.StringIO(), io.StringIO()
    chart = tmp_path / "chart.png"
    status = bench.main(["--port", "1", "--chart", str(chart), "--concurrency", "1,5"],
                        out=out, err=err)
    assert status == bench.EXIT_USAGE
    assert err.getvalue() == ("relaymail-bench: --chart needs matplotlib: "
                              "pip install relaymail[bench]\n")
    assert out.getvalue() == ""
    assert not chart.exists()


def test_pid_of_no_process_is_a_usage_error():
    err = io.StringIO()
    status = bench.main(["--port", "1", "--pid", str(2**22 + 1)], out=io.StringIO(), err=err)
    assert status == bench.EXIT_USAGE
    assert err.getvalue() == f"relaymail-bench: --pid {2**22 + 1}: no such process\n"


def test_concurrency_levels_give_one_report_each(nexthop):
    status, report = run_bench("--port", str(nexthop.port), "--messages", "4",
                               "--concurrency", "1,2")
    assert status == bench.EXIT_OK
    assert [(run["sessions"], run["sent"]) for run in report["runs"]] == [(1, 4), (2, 4)]


def test_chart_runs_every_level_and_saves_the_png(monkeypatch, nexthop, tmp_path):
    # A stand-in for matplotlib, which the test venv does not install: what
    # is pinned is which numbers are drawn and where the file goes.
    pyplot = mock.MagicMock()
    figure, throughput = mock.MagicMock(), mock.MagicMock()
    pyplot.subplots.return_value = (figure, throughput)
    matplotlib = mock.MagicMock(pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    chart = str(tmp_path / "chart.png")
    status, report = run_bench("--port", str(nexthop.port), "--messages", "4",
                               "--chart", chart, "--concurrency", "1,2,4")
    assert status == bench.EXIT_OK
    assert [run["sessions"] for run in report["runs"]] == [1, 2, 4]
    matplotlib.use.assert_called_once_with("Agg")
    levels, rates = throughput.plot.call_args.args[:2]
    assert levels == [1, 2, 4]
    assert rates == [run["messages_per_second"] for run in report["runs"]]
    levels, p99 = throughput.twinx.return_value.plot.call_args.args[:2]
    assert p99 == [run["latency_ms"]["p99"] for run in report["runs"]]
    figure.savefig.assert_called_once_with(chart, dpi=100)


def test_server_figures_cover_the_relays_workers(relay):
    # The master takes no mail itself: a CPU or memory figure that stopped
    # at its pid would say nothing about the relay (it said 0.0 s).
    master = relay.process.pid
    master_cpu = _own_cpu(master)
    # Enough messages that the workers' CPU is well past the master's
    # 0.05 s bound: 20 took about 0.05 s once commits were batched.
    status, report = run_bench("--port", str(relay.port), "--messages", "100", "--sessions", "4",
                               "--pid", str(master))
    assert status == bench.EXIT_OK
    workers = [pid for pid in bench.process_tree(master) if pid != master]
    assert len(workers) >= 2
    assert _own_cpu(master) - master_cpu < 0.05 < report["server"]["cpu_seconds"]
    with open(f"/proc/{master}/status") as f:
        master_rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert report["server"]["start_rss_bytes"] > 2 * master_rss


def _own_cpu(pid):
    fields = bench._stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / bench.clock_ticks()


def test_idle_sessions_are_held_and_noop_timed_beside_them(relay):
    status, report = run_bench("--port", str(relay.port), "--idle", "40",
                               "--pid", str(relay.process.pid))
    assert status == bench.EXIT_OK
    assert (report["idle_sessions"], report["refused"]) == (40, 0)
    assert 0 < report["noop_ms"]["p50"] <= report["noop_ms"]["p99"]
    server = report["server"]
    assert server["rss_per_session_bytes"] == round(
        (server["rss_after_bytes"] - server["rss_before_bytes"]) / 40)


def test_idle_without_a_server_reports_the_refusals():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(OSError):
        run_bench("--port", str(port), "--idle", "3")


def test_compare_passes_the_run_on_to_compare_py(monkeypatch, tmp_path):
    from relaymail.tools import bench_compare
    script = tmp_path / "compare.py"
    script.write_text("import sys\nprint('ARGS', ' '.join(sys.argv[1:]))\n")
    monkeypatch.setenv("RELAYMAIL_COMPARE", str(script))
    monkeypatch.setattr(bench_compare.shutil, "which", lambda name: "/usr/sbin/" + name)
    out, err = io.StringIO(), io.StringIO()
    status = bench.main(["--compare", "--messages", "300", "--sessions", "7", "--reuse",
                         "--compare-mode", "relay"], out=out, err=err)
    assert (status, err.getvalue()) == (0, "")
    assert out.getvalue() == ("ARGS --targets sink,postfix,relaymail --mode relay --sessions 7 "
                              "--messages 300 --length 4096 --rcpts 1 --reuse\n")


def test_compare_without_postfix_tools_says_so_in_one_line(monkeypatch, tmp_path):
    from relaymail.tools import bench_compare
    script = tmp_path / "compare.py"
    script.write_text("raise SystemExit(9)\n")
    monkeypatch.setenv("RELAYMAIL_COMPARE", str(script))
    monkeypatch.setattr(bench_compare.shutil, "which", lambda name: None)
    out, err = io.StringIO(), io.StringIO()
    assert bench.main(["--compare"], out=out, err=err) == bench.EXIT_USAGE
    assert err.getvalue() == ("relaymail-bench: --compare: Postfix's smtp-source is not installed "
                              "(Debian: apt-get install postfix); compare.py needs it\n")


def test_port_is_needed_but_for_compare():
    out, err = io.StringIO(), io.StringIO()
    assert bench.main(["--messages", "1"], out=out, err=err) == bench.EXIT_USAGE
    assert err.getvalue() == "relaymail-bench: --port is needed (the server to load)\n"
