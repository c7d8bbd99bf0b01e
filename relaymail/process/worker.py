"""A worker process: ``python -m relaymail.process.worker ROLE ...``.

The master (:mod:`relaymail.process.master`) starts every worker itself;
nobody else should.  A worker reads the same config file with the same
command-line overrides as the master (which validated it a moment
before), builds the services of its role (:mod:`relaymail.process.roles`)
on the descriptors the master passed it, and runs its own reactor until
SIGTERM or until its master is gone.

Descriptors are named on the command line as ``--fd NAME=NUMBER``:

``lock``
    the spool lock, so the spool stays locked while any worker of this
    master lives, even one that outlived it;
``listen.I``
    the I-th listening socket of :func:`relaymail.tap.listener_specs`
    (inbound workers);
``pickup.K``
    the datagram socket of partition K: sending ends for inbound workers,
    the receiving end of its own partition for a delivery worker;
``control``
    a delivery worker's end of the master's control connection.
"""

import argparse
import ctypes
import os
import signal
import sys

from twisted.logger import globalLogBeginner, Logger

from relaymail import logobserver
from relaymail.config import ConfigError, load_config
from relaymail.process.launch import GO, READY, Launch, overrides_from
from relaymail.queue import queue_id

log = Logger(namespace="relaymail.process")

_PR_SET_PDEATHSIG = 1


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="relaymail worker")
    parser.add_argument("role", choices=("inbound", "delivery", "check"))
    parser.add_argument("--name", required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--master-pid", type=int, required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--log", choices=("lines", "json", "events"), default="lines")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--limits-row", type=int, default=0)
    parser.add_argument("--limits-rows", type=int, default=0)
    parser.add_argument("--fd", action="append", default=[], type=_named_fd)
    return parser.parse_args(argv)


def _named_fd(text):
    name, _, number = text.partition("=")
    return name, int(number)


def die_with(master_pid):
    """Get SIGTERM when the master exits, even by SIGKILL (Linux), so a
    worker never goes on alone; exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass        # elsewhere the master's pipe on stdin tells (below)
    if os.getppid() != master_pid:
        raise SystemExit(f"relaymail worker: master {master_pid} is gone")


def begin_logging(mode, name):
    """``lines``: write the master's own line format to the standard output
    the master shares with us; ``events``: write each event as JSON, which
    the master logs as its own (when it logs to a file or syslog)."""
    observer = {"lines": logobserver.TextObserver,
                "json": logobserver.JSONObserver}.get(mode)
    observer = (observer(sys.stdout, name) if observer is not None
                else logobserver.EventObserver(sys.stdout))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False,
                                     discardBuffer=True)


def main(argv=None):
    # The master starts us with SIGHUP blocked, so that a reload during
    # start-up is not a kill; unblocked at once (a process a plugin starts
    # would inherit the mask), it is noted until the real handler is in.
    early_hup = []
    signal.signal(signal.SIGHUP, lambda *_: early_hup.append(True))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    die_with(arguments.master_pid)
    queue_id.use_slot(arguments.slot)
    begin_logging(arguments.log, arguments.name)
    # Not left for a plugin's child processes to inherit.
    config_text = os.environ.pop(Launch.TEXT_VARIABLE, None)
    from relaymail import config
    config.CHECK_CERTIFICATE_DATES = False      # the master's job (see there)
    try:
        settings = load_config(arguments.config, overrides_from(arguments.overrides), config_text)
        if arguments.role == "check":
            # Run as the --uid user by the master before anything starts.
            from relaymail.tap import check_files
            check_files(settings)
            return
    except ConfigError as error:
        raise SystemExit(f"relaymail {arguments.name}: {error}")
    from twisted.internet import reactor
    from relaymail import clock, dispatch
    from relaymail.process import roles
    clock.run_steadily(reactor)     # before anything is timed by it
    dispatch.dispatch_plainly(reactor)
    fds = dict(arguments.fd)
    for fd in fds.values():
        # Ours alone: a process a plugin starts must not keep the spool
        # lock or a listener (relaymail.queue.lock).
        os.set_inheritable(fd, False)
    top = roles.build(arguments, settings, reactor, fds)
    if arguments.role == "inbound" and os.read(0, 1) != GO:
        # Waits while the master removes the last run's leftovers; EOF:
        # the master is gone.
        raise SystemExit(0)
    exit_code = []

    def start():
        try:
            top.startService()
        except Exception:
            log.failure("{name} could not start", name=arguments.name)
            exit_code.append(1)
            reactor.stop()
            return
        ready = fds.pop("ready", None)
        if ready is not None:
            # Accepting now: the master starts the delivery workers once
            # every inbound one says so (relaymail.process.master).
            try:
                os.write(ready, READY)
            except OSError:
                pass        # the master is gone; watch_master ends us
            os.close(ready)
    def stop_once(*_):
        # SIGTERM comes from the master, and again from the kernel when the
        # master exits (die_with), and the master's pipe closes too: the
        # first of them stops the reactor, the others have nothing to do.
        if not stopping:
            stopping.append(True)
            reactor.callFromThread(reactor.stop)
    stopping = []

    sessions = getattr(top, "sessions", None)

    def replaced(*_):
        # SIGHUP from the master: a successor with the new config takes
        # new connections; our sessions may finish (relaymail.smtp.sessions).
        if sessions is not None and not stopping:
            sessions.patient = True
        stop_once()

    def terminated(*_):
        # SIGTERM after a SIGHUP: the relay is stopping after all, and the
        # sessions that were let go on are told now.
        if sessions is not None and stopping:
            reactor.callFromThread(sessions.hurry)
        stop_once()

    def handle_signals():
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, terminated)
        signal.signal(signal.SIGHUP, replaced)
        if early_hup:
            replaced()      # one that came during start-up
    reactor.callWhenRunning(handle_signals)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    roles.watch_master(reactor, stop_once)
    reactor.run()
    raise SystemExit(exit_code[0] if exit_code else 0)


if __name__ == "__main__":
    main()
