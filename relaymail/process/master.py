"""The master: the one ``twistd -n relaymail`` process when
``[server] workers`` is not 0 (the design: docs/architecture.rst).

It holds what there must be one of -- the pid file, the log, the spool
lock, the listening sockets and the queue tool's control socket -- and
runs no SMTP session and no delivery itself.  At start it

1. binds every listener (as root, if twistd started as root) and stops
   reading them: the workers accept;
2. empties the spool's ``tmp/`` (the leftovers of the last run; bounded by
   the sessions that were open, not by the queue);
3. makes one datagram socket pair per delivery partition
   (:mod:`relaymail.process.pickup`), kept for its whole life;
4. starts ``[server] workers`` inbound workers and ``[delivery] workers``
   delivery workers (:mod:`relaymail.process.worker`);
5. while they start, removes the last run's lone records from ``active/``
   and ``hold/`` (removals and moves a crash cut), then lets the inbound
   workers accept (:data:`relaymail.process.launch.GO`).

A worker that exits without being asked to is started again, at once the
first time and with a growing delay if it keeps dying young.  Before the
successor starts, what the dead one left unfinished in ``tmp/`` is
removed (it never got a 250); for a dead inbound worker, every delivery
worker is asked to pick up messages it was not told of.  A delivery
worker's successor owns the same partition and recovers and schedules it
afresh, so nothing its predecessor claimed is lost, and because it starts
only after the predecessor has exited, no message ever has two owners.

Queue tool requests on ``QUEUE/control`` are passed to the delivery worker
owning the message (or to all of them, for ``flush`` and ``delete ALL``).
"""

import contextlib
import os
import signal
import socket
import sys
import time

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

import relaymail
from relaymail import clock, logobserver
from relaymail.metrics import instruments
from relaymail.process.launch import GO
from relaymail.process.pickup import socket_pair
from relaymail.process.shared_counts import LimitsRegion
from relaymail.queue.control import ControlError, listen_control
from relaymail.queue import queue_id
from relaymail.queue.partition import owner_test, partition_of
from relaymail.queue.spool import Spool

log = Logger(namespace="relaymail.process")

#: How a worker is started.  -P (Python 3.11): its sys.path does not begin
#: with its working directory, the launch directory, as ``python -m``'s
#: does.  Without it a relaymail/ there was what the workers imported, as
#: root: an administrator's checkout, older or newer than the installed
#: relay the master runs, or one planted by anyone who can write there
#: (a relay started from /tmp).
WORKER_COMMAND = (sys.executable, "-P", "-m", "relaymail.process.worker")

#: A worker that exits within this many seconds of starting "died young":
#: its successor waits, twice as long each time, up to MAX_RESTART_DELAY.
YOUNG = 10.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0

#: How often every delivery worker is asked to pick up messages it was not
#: told of (relaymail.process.pickup): Postfix's qmgr is woken every 300 s
#: (master.cf's wakeup time); a minute is a shorter worst case for a lost
#: notice, and a scan of active/ costs about 0.2 s with 100,000 messages.
PICKUP_INTERVAL = 60.0
#: Seconds after an inbound worker's end before the delivery workers are
#: asked to pick up what it did not tell them of: past the age a message
#: must have to be picked up (relaymail.queue.scheduler.PICKUP_MIN_AGE),
#: so that its last commits are.
PICKUP_DELAY = 3.0

#: Seconds the workers get to stop after SIGTERM, beyond their own
#: ``[server] shutdown_grace`` and the few seconds a drain may add
#: (relaymail.smtp.sessions, Scheduler.drain), before SIGKILL.
STOP_MARGIN = 15.0
#: Seconds the delivery workers wait at most for the inbound ones to say
#: they accept: an inbound worker that cannot start must not keep the
#: queue from being delivered.
DELIVERY_START_WAIT = 3.0

INBOUND = "inbound"
DELIVERY = "delivery"


class _Worker:
    """What the master knows of one worker slot, across its successors."""

    def __init__(self, role, number, slot, partition=0, limits_row=None):
        self.role = role
        self.name = f"{role}.{number}"
        self.slot = slot
        self.partition = partition
        self.process = None         # the live process's transport
        self.pid = None             # its pid (the transport forgets it at the end)
        self.started_at = None
        self.young_deaths = 0
        self.limits_row = limits_row    # an inbound worker's row of shared limits
        self.control = None         # a delivery worker's WorkerControl
        self.ended = None           # a Deferred while a stop waits for it
        self.retiring = False       # SIGHUP: ending for a successor with the new config
        self.limits = None          # an inbound worker's LimitsRegion
        self.ready_fd = None        # the child's fd number of its ready pipe
        self.ready = False          # it said it accepts


class Master(service.Service):
    """Starts, watches and stops the workers.

    :param settings: the validated settings.
    :param lock: the SpoolLock, held.
    :param launch: the relaymail.process.launch.Launch workers start with.
    :param log_lines: True when the master logs lines to standard output,
        which the workers then share; else they send their events to the
        master over a pipe.
    """

    def __init__(self, settings, lock, launch, log_lines, reactor):
        from relaymail.tap import listen_endpoint, listener_specs
        self.settings = settings
        self._lock = lock
        self._launch = launch
        self._log_lines = log_lines
        self._reactor = reactor
        self._endpoints = [listen_endpoint(settings, reactor, key, description)
                           for key, description, _ in listener_specs(settings)]
        self._ports = []
        self._pairs = []
        self._spool = Spool(settings.queue.path, reactor=reactor)
        partitions = settings.delivery.workers
        self.delivery = [_Worker(DELIVERY, k, slot=1 + k, partition=k) for k in range(partitions)]
        self.inbound = [_Worker(INBOUND, n + 1, slot=1 + partitions + n, limits_row=n)
                        for n in range(settings.server.workers)]
        # Slots of workers alive (or with leftovers not yet removed): a
        # reload's new inbound workers take free ones, never a live one's.
        self._slots = {worker.slot for worker in self.delivery + self.inbound}
        self._retiring = []         # old inbound workers finishing after a reload
        self._reload_waiting = False
        self._limits = None         # the LimitsRegion of the inbound workers
        self._control_port = None
        self._sweeper = None
        self._delivery_started = False
        self._delivery_timer = None
        self._stopping = False
        self._writers_may_go = False
        #: The run's relaymail.metrics.rundir.RunDirectory when [metrics]
        #: listen is set: the workers count into it.
        self.metrics_dir = None

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self):
        super().privilegedStartService()
        for endpoint in self._endpoints:
            outcome = []
            endpoint.listen(_NeverAccepts()).addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                outcome[0].raiseException()
            port = outcome[0]
            # Bound and listening; the workers accept, not the master.
            port.stopReading()
            # At the stop the master only closes its copy, as Twisted does
            # with an adopted socket.  A shutdown() would end the socket in
            # every worker at once: the connections waiting in the backlog
            # reset, and a worker's accept() failing with EINVAL (an
            # Unhandled Error) before it has stopped reading the listener.
            port._shouldShutdown = False
            self._ports.append(port)

    def startService(self):
        super().startService()
        if not self._ports and self._endpoints:
            self.privilegedStartService()
        self._spool.prepare_for_writers()
        self._limits = LimitsRegion(len(self.inbound), self.settings)
        for worker in self.inbound:
            worker.limits = self._limits
        self._pairs = [socket_pair() for _ in self.delivery]
        # Inbound first: the sooner a listener is served, the sooner mail
        # is taken.  Delivery starts once every inbound worker accepts: its
        # imports and its scan of the queue would otherwise share the cores
        # with theirs (on two cores and 100,000 messages queued, the first
        # 220 came after 1.26 s instead of 0.98 s), while the queue waits.
        for worker in self.inbound:
            self._spawn(worker)
        self._delivery_timer = self._reactor.callLater(DELIVERY_START_WAIT,
                                                       self._delivery_waited_enough)
        # While the workers start (0.5 s of imports), the leftovers of the
        # last run; an inbound worker waits for the word to go before it
        # accepts, and no worker writes a record beside a queue file
        # before then, so nothing of this run can be taken for one.
        self._spool.remove_lone_records()
        self._writers_may_go = True
        for worker in self.inbound:
            self._let_go(worker)
        self._control_port = listen_control(self._reactor, self.settings.queue.path,
                                            RelayedControl(self))
        self._sweeper = task.LoopingCall(self._pick_up_everywhere, "periodic")
        self._sweeper.clock = self._reactor
        self._sweeper.start(PICKUP_INTERVAL, now=False)
        signal.signal(signal.SIGHUP,
                      lambda *_: self._reactor.callFromThread(self.reload))

    def _start_delivery(self):
        if self._delivery_started or self._stopping:
            return
        self._delivery_started = True
        if self._delivery_timer is not None and self._delivery_timer.active():
            self._delivery_timer.cancel()
        for worker in self.delivery:
            self._spawn(worker)

    def _delivery_waited_enough(self):
        waiting = [worker.name for worker in self.inbound if not worker.ready]
        log.warn("{waiting} not accepting after {wait:g}s; starting the delivery workers "
                 "anyway", waiting=", ".join(waiting), wait=DELIVERY_START_WAIT)
        self._start_delivery()

    def inbound_ready(self, worker):
        """``worker`` accepts connections (its ready pipe said so)."""
        worker.ready = True
        if all(each.ready for each in self.inbound):
            self._start_delivery()

    def _spawn(self, worker):
        if self._stopping:
            return
        if worker.role == INBOUND and worker not in self.inbound:
            # Died, then a reload replaced its generation before the restart.
            log.info("{name} of the old configuration is not restarted: the reload "
                     "started its successor", name=worker.name)
            return
        try:
            self._start_process(worker)
        except OSError as error:
            # EAGAIN, EMFILE...: the slot must not stay empty for good (a
            # partition nobody delivers); try again as after a death.
            worker.young_deaths += 1
            delay = _restart_delay(worker.young_deaths + 1)
            log.error("Cannot start {name}: {error}; trying again in {delay:.1f}s",
                      name=worker.name, error=error, delay=delay)
            self._reactor.callLater(delay, self._spawn, worker)

    def _start_process(self, worker):
        named = {"lock": self._lock.fileno()}
        arguments = [worker.role, "--name", worker.name, "--slot", str(worker.slot),
                     "--master-pid", str(os.getpid()),
                     "--log", logobserver.worker_mode(self._log_lines),
                     *self._launch.arguments()]
        control_end = None
        if worker.role == INBOUND:
            named["limits"] = worker.limits.fd
            named["ready"] = "r"
            arguments += ["--limits-row", str(worker.limits_row),
                          "--limits-rows", str(worker.limits.rows)]
            for index, port in enumerate(self._ports):
                named[f"listen.{index}"] = port.fileno()
            for index, (_receiving, sending) in enumerate(self._pairs):
                named[f"pickup.{index}"] = sending.fileno()
        else:
            arguments += ["--partition", str(worker.partition),
                          "--partitions", str(len(self.delivery))]
            named[f"pickup.{worker.partition}"] = self._pairs[worker.partition][0].fileno()
            master_end, control_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            named["control"] = control_end.fileno()
        try:
            self._exec(worker, arguments, named)
        except BaseException:
            if control_end is not None:
                master_end.close()
            raise
        finally:
            if control_end is not None:
                control_end.close()
        if control_end is not None:
            worker.control = WorkerControl()
            self._reactor.adoptStreamConnection(master_end.fileno(), socket.AF_UNIX,
                                                _Given(worker.control))
            master_end.close()
        log.info("Started {name} (pid {pid})", name=worker.name, pid=worker.pid)

    def _exec(self, worker, arguments, named):
        child_fds = {0: "w", 1: 1 if self._log_lines else "r", 2: 2 if self._log_lines else "r"}
        worker.ready = False
        worker.ready_fd = None
        for number, (name, fd) in enumerate(named.items(), start=3):
            # "r": a pipe the child writes and _WorkerProcess reads.
            child_fds[number] = fd
            arguments += ["--fd", f"{name}={number}"]
            if name == "ready":
                worker.ready_fd = number
        argv = [*WORKER_COMMAND, *arguments]
        env = self._launch.environment(_environment())
        if self.metrics_dir is not None:
            env = self.metrics_dir.environment(env)
        with _sighup_blocked():
            # The worker inherits the mask and unblocks SIGHUP once its
            # handler is in place: a reload during its 0.5 s of imports
            # is then taken late, not as the default "terminate".
            worker.process = self._reactor.spawnProcess(
                _WorkerProcess(self, worker), sys.executable, argv,
                env=env, path=self._launch.directory, childFDs=child_fds)
        worker.pid = worker.process.pid
        worker.started_at = time.monotonic()
        if worker.role == INBOUND and self._writers_may_go:
            self._let_go(worker)

    def _let_go(self, worker):
        """Tell an inbound worker it may accept: its slot has no leftovers."""
        if worker.process is not None:
            worker.process.write(GO)

    # -- a worker ended ---------------------------------------------------------

    def _ended(self, worker, status):
        pid = worker.pid
        worker.process = None
        if self.metrics_dir is not None:
            self.metrics_dir.process_dead(pid)
        if worker.control is not None:
            worker.control.transport.loseConnection()
            worker.control = None
        if worker.ended is not None:
            ended, worker.ended = worker.ended, None
            ended.callback(None)
        if self._stopping:
            return
        if worker.retiring:
            self._retired(worker, status)
            return
        lived = time.monotonic() - worker.started_at
        worker.young_deaths = worker.young_deaths + 1 if lived < YOUNG else 0
        delay = _restart_delay(worker.young_deaths)
        removed = self._clean_up_after(worker)
        instruments.worker_restarted(worker.role)
        log.warn("{name} (pid {pid}) {status} after {lived:.1f}s; {removed} unfinished files "
                 "removed; restarting it in {delay:.1f}s", name=worker.name, pid=pid,
                 status=status, lived=lived, removed=removed, delay=delay)
        self._reactor.callLater(delay, self._spawn, worker)
        if worker.role == INBOUND:
            self._pick_up_soon(f"after {worker.name} died")

    def running_workers(self):
        """``[(name, role, pid, seconds up)]`` of every live worker, the
        old generation's finishing ones too (relaymail.metrics)."""
        now = time.monotonic()
        return [(worker.name + (" (old)" if worker.retiring else ""), worker.role, worker.pid,
                 now - worker.started_at)
                for worker in self.inbound + self._retiring + self.delivery
                if worker.process is not None]

    # -- SIGHUP -------------------------------------------------------------------

    def reload(self):
        """Read the config again; if it validates, replace every worker by
        one started with it (relaymail.process.reload), without a gap in
        accepting: the listeners stay bound here, and new connections wait
        in the backlog for the new inbound workers while the old ones
        finish their sessions."""
        from relaymail.config import ConfigError
        from relaymail.process.reload import reread
        from relaymail.tap import check_files, log_warnings
        if self._stopping:
            return
        if self._retiring or any(worker.retiring for worker in self.delivery):
            # Two generations at once at most: this one waits its turn.
            self._reload_waiting = True
            log.info("SIGHUP: the last reload's old workers are still finishing; "
                     "reloading again once they have")
            return
        try:
            launch, settings, notes = reread(self._launch, self.settings)
            check_files(settings)
        except ConfigError as error:
            log.error("SIGHUP: reload refused, the running configuration stays: {error}",
                      error=str(error))
            return
        for note in notes:
            log.warn("SIGHUP: {note}", note=note)
        log_warnings(settings, "SIGHUP: ")
        self._launch, self.settings = launch, settings
        old_inbound, old_limits = self.inbound, self._limits
        if old_limits.fits(settings):
            # The new workers count in the other bank of the same region,
            # every row read by all: the old workers' sessions, attempts
            # and rates count against the limits while they finish.
            old_limits.next_bank()
        else:
            self._limits = LimitsRegion(len(old_inbound), settings)
            log.warn("SIGHUP: the new limits size the shared tables anew ([limits] connections, "
                     "[plugin:ratelimit] max_keys or [plugin:callout] cache_entries changed): "
                     "connections, rates and AUTH attempts are counted afresh, and the old "
                     "workers' sessions, while they finish, are not counted against the limits")
        self.inbound = []
        for number in range(len(old_inbound)):
            worker = _Worker(INBOUND, number + 1, slot=self._free_slot(),
                             limits_row=self._limits.row(number))
            worker.limits = self._limits
            self.inbound.append(worker)
        for worker in self.inbound:
            self._spawn(worker)
        for worker in old_inbound:
            if worker.process is None:
                # Dead, its restart pending: the restart is dropped (it is
                # no longer in self.inbound) and its files went at its death.
                self._slots.discard(worker.slot)
                continue
            self._retire(worker)
            self._retiring.append(worker)
        if old_limits is not self._limits and not self._retiring:
            old_limits.close()
        for worker in self.delivery:
            self._retire(worker)
        log.info("SIGHUP: {config} reloaded; {inbound} inbound and {delivery} delivery workers "
                 "replaced as they finish their work (up to {grace:g}s)",
                 config=launch.config or "the defaults", inbound=len(self.inbound),
                 delivery=len(self.delivery), grace=settings.server.shutdown_grace)

    def _free_slot(self):
        for slot in range(1, queue_id.SLOTS):
            if slot not in self._slots:
                self._slots.add(slot)
                return slot
        raise RuntimeError("no free queue id slot")

    def _retire(self, worker):
        worker.retiring = True
        if worker.process is None:
            # Between a death and its restart: the restart takes the new config.
            worker.retiring = False
            return
        try:
            # HUP, not TERM: its sessions may go on to their end.
            worker.process.signalProcess("HUP")
        except (OSError, ProcessExitedAlready):
            pass

    def _retired(self, worker, status):
        """An old worker ended after a reload: a delivery worker's
        successor takes its partition now; an inbound one's slot is freed."""
        worker.retiring = False
        removed = self._clean_up_after(worker)
        log.info("{name} (pid {pid}) of the old configuration {status}; {removed} unfinished "
                 "files removed", name=worker.name, pid=worker.pid, status=status,
                 removed=removed)
        if worker.role == DELIVERY:
            worker.young_deaths = 0
            self._spawn(worker)
        else:
            self._retiring.remove(worker)
            self._slots.discard(worker.slot)
            if (worker.limits is not self._limits
                    and not any(old.limits is worker.limits for old in self._retiring)):
                worker.limits.close()
            # Sessions it cut or left may hold notices it did not send.
            self._pick_up_soon(f"after the old {worker.name} ended")
        if (self._reload_waiting and not self._retiring
                and not any(w.retiring for w in self.delivery)):
            self._reload_waiting = False
            self.reload()

    def _pick_up_soon(self, why):
        self._reactor.callLater(PICKUP_DELAY, self._pick_up_everywhere, why)

    def _pick_up_everywhere(self, why):
        """Have every delivery worker schedule what it was not told of."""
        if self._stopping:
            return
        for worker in self.delivery:
            if worker.control is None:
                continue        # restarting: it scans its partition anyway

            def picked_up(reply, worker=worker):
                count = _count(reply)
                if count:
                    log.warn("{name} picked up {count} messages it had not been told of "
                             "({why})", name=worker.name, count=count, why=why)
            worker.control.ask("pickup").addCallback(picked_up).addErrback(lambda _: None)

    def _clean_up_after(self, worker):
        try:
            # What it was writing (tmp/).  A commit is one rename of a
            # whole queue file, so nothing of it can be half in active/; a
            # delivery worker's removal cut half way leaves a lone record,
            # which its successor's recovery removes (Spool.recover).
            if worker.role == INBOUND:
                # Its connections are gone with it.  Its region is open
                # until the last worker using it has been cleaned up after.
                worker.limits.clear_connections(worker.limits_row)
                return self._spool.remove_unfinished(slot=worker.slot)
            owns = owner_test(worker.partition, len(self.delivery)) or (lambda _: True)
            return self._spool.remove_unfinished(slot=worker.slot, owns=owns)
        except OSError as error:
            log.error("Cannot clean up after {name}: {error}", name=worker.name, error=error)
            return 0

    # -- stop ---------------------------------------------------------------------

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._delivery_timer is not None and self._delivery_timer.active():
            self._delivery_timer.cancel()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        waiting = []
        for worker in self.inbound + self._retiring + self.delivery:
            if worker.process is None:
                continue
            worker.ended = defer.Deferred()
            waiting.append(worker.ended)
            try:
                worker.process.signalProcess("TERM")
            except (OSError, ProcessExitedAlready):
                pass        # reaped, its pipes not yet closed: ended comes
        # Our copies of the listeners closed now: once the workers have
        # closed theirs (at once, as they begin to drain), a new client is
        # refused and tries the next MX rather than wait in the backlog.
        ports, self._ports = self._ports, []
        closing = [defer.maybeDeferred(port.stopListening) for port in ports]
        killer = self._reactor.callLater(self._stop_grace(), self._kill_the_rest)
        done = defer.DeferredList(waiting)

        def stopped(_):
            if killer.active():
                killer.cancel()
            if self._control_port is not None:
                closing.append(defer.maybeDeferred(self._control_port.stopListening))
            for receiving, sending in self._pairs:
                receiving.close()
                sending.close()
            if self._limits is not None:
                self._limits.close()
                self._limits = None
            return defer.DeferredList(closing)
        return done.addCallback(stopped)

    def _stop_grace(self):
        return self.settings.server.shutdown_grace + STOP_MARGIN

    def _kill_the_rest(self):
        for worker in self.inbound + self._retiring + self.delivery:
            if worker.process is not None:
                log.warn("{name} did not stop within {grace:.0f}s: killing it",
                         name=worker.name, grace=self._stop_grace())
                try:
                    worker.process.signalProcess("KILL")
                except (OSError, ProcessExitedAlready):
                    pass


@contextlib.contextmanager
def _sighup_blocked():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class WorkersCannotStart(Exception):
    """A worker would fail as the ``--uid`` user; the text says why."""


def check_workers_can_start(launch, uid, gid):
    """Raise WorkersCannotStart, saying why, when a worker could not start
    as ``uid``/``gid`` (twistd's ``--uid``).  The master starts every worker
    after it has given up root, and a worker reads the config's files (TLS
    key, password files, plugin tables) itself: so a worker is tried for
    real, once, as that user, before anything starts, checking what its
    start would check (relaymail.process.roles.check)."""
    import subprocess

    def become_the_relay_user():
        os.setgroups([])
        if gid is not None and gid >= 0:
            os.setgid(gid)
        os.setuid(uid)
    argv = [*WORKER_COMMAND, "check", "--name", "check",
            "--slot", "0", "--master-pid", str(os.getpid()), *launch.arguments()]
    try:
        tried = subprocess.run(argv, env=launch.environment(_environment()), capture_output=True,
                               text=True, timeout=60, preexec_fn=become_the_relay_user,
                               cwd=launch.directory)
    except OSError as error:
        raise WorkersCannotStart(f"workers cannot start as uid {uid}: {sys.executable}: "
                                 f"{error.strerror}") from None
    if tried.returncode != 0:
        last = (tried.stderr.strip().splitlines() or ["exit status " + str(tried.returncode)])[-1]
        raise WorkersCannotStart(f"workers cannot start as uid {uid}: "
                                 f"{last.removeprefix('relaymail check: ')}")


def _restart_delay(young_deaths):
    """At once after a first early death (or a death after a long life),
    then 0.5 s, doubling up to MAX_RESTART_DELAY."""
    if young_deaths <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** (young_deaths - 2))


def _environment():
    """The workers' environment: ours, with relaymail importable from where
    this process imported it (a checkout, or site-packages)."""
    env = clock.for_workers(os.environ)
    # Set for a worker only by Master._exec, when [metrics] listen is on.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    home = os.path.dirname(os.path.dirname(os.path.abspath(relaymail.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH")]))
    return env


class _NeverAccepts(protocol.Factory):
    """The master's factory on the listeners it binds but never reads."""

    noisy = False


class _Given(protocol.Factory):
    """A factory that hands out one protocol made beforehand."""

    def __init__(self, instance):
        self._instance = instance

    def buildProtocol(self, addr):
        return self._instance


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker process as the master sees it: its end, and (when the
    workers cannot share the master's standard output) its log events."""

    def __init__(self, master, worker):
        self._master = master
        self._worker = worker
        self._partial = {}

    def childDataReceived(self, fd, data):
        if fd == self._worker.ready_fd:
            if data:
                self._master.inbound_ready(self._worker)
            return
        lines = (self._partial.pop(fd, b"") + data).split(b"\n")
        if lines[-1]:
            self._partial[fd] = lines[-1]
        for line in lines[:-1]:
            if line:
                self._log(fd, line.decode("utf-8", "replace"))

    def _log(self, fd, line):
        """An event the worker wrote as JSON on standard output, logged as
        it was (level, time, traceback) under the worker's name; anything
        else (standard error: a worker that failed before its logging
        began) as an error line."""
        if fd == 1:
            try:
                event = eventFromJSON(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                # As the workers name themselves on a shared stdout.
                level = event.get("log_level")
                event["log_system"] = (f"{self._worker.name} {event.get('log_namespace', '-')}"
                                       f"#{getattr(level, 'name', level)}")
                globalLogPublisher(event)
                return
        log.emit(LogLevel.error, "{line}", line=line, log_system=self._worker.name)

    def processEnded(self, reason):
        value = reason.value
        if getattr(value, "signal", None):
            status = f"was killed by signal {value.signal}"
        else:
            status = f"exited with status {getattr(value, 'exitCode', '?')}"
        self._master._ended(self._worker, status)


class WorkerControl(LineReceiver):
    """The master's end of a delivery worker's control connection: one
    request line at a time, replies in order (relaymail.queue.control)."""

    delimiter = b"\n"

    def __init__(self):
        self._waiting = []

    def ask(self, line):
        if self.transport is None or not self.connected:
            return defer.fail(ControlError("the delivery worker is restarting; try again"))
        reply = defer.Deferred()
        self._waiting.append(reply)
        self.sendLine(line.encode("ascii"))
        return reply

    def lineReceived(self, line):
        if self._waiting:
            self._waiting.pop(0).callback(line.decode("ascii", "replace"))

    def connectionLost(self, reason):
        LineReceiver.connectionLost(self, reason)
        waiting, self._waiting = self._waiting, []
        for reply in waiting:
            reply.errback(ControlError("the delivery worker stopped before it answered"))


class RelayedControl:
    """The queue tool's requests, carried to the delivery workers
    (an :class:`relaymail.queue.control.IQueueControl`)."""

    def __init__(self, master):
        self._master = master

    def _ask(self, worker, line):
        if worker.control is None:
            return defer.fail(ControlError(f"{worker.name} is restarting; try again"))
        return worker.control.ask(line)

    def _by_id(self, queue_id, line):
        workers = self._master.delivery
        worker = workers[partition_of(queue_id, len(workers))]
        return self._ask(worker, line).addCallback(_found)

    def _counted(self, line):
        replies = [self._ask(worker, line).addCallback(_count) for worker in self._master.delivery]
        done = defer.gatherResults(replies, consumeErrors=True)
        done.addErrback(lambda failure: failure.value.subFailure)
        return done.addCallback(sum)

    def flush(self, domain=None):
        return self._counted("flush" if domain is None else f"flush {domain}")

    def pickup(self):
        return self._counted("pickup")

    def delete_all(self):
        return self._counted("delete ALL")

    def retry(self, queue_id):
        return self._by_id(queue_id, f"retry {queue_id}")

    def delete(self, queue_id):
        return self._by_id(queue_id, f"delete {queue_id}")

    def hold(self, queue_id):
        return self._by_id(queue_id, f"hold {queue_id}")

    def release(self, queue_id):
        return self._by_id(queue_id, f"release {queue_id}")


def _ok_text(reply):
    """The text of a worker's ``ok`` reply; its ``error`` reply's text (or
    anything else it said) as a ControlError."""
    status, _, text = reply.partition(" ")
    if status == "ok":
        return text
    raise ControlError(text if status == "error" else reply)


def _found(reply):
    """A worker's reply about one message: True, False (no such message),
    or its error as a ControlError."""
    try:
        _ok_text(reply)
    except ControlError as error:
        if str(error).startswith("no such message"):
            return False
        raise
    return True


def _count(reply):
    """The count of a worker's ``ok 3 messages ...`` reply."""
    return int(_ok_text(reply).split()[0])
