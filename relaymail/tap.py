"""``twistd relaymail``: command-line options and the service tree.

Before building anything, :func:`build_service` makes sure the process may
open the files its limits imply (:mod:`relaymail.file_limit`).
"""

import errno
import os
import sys
import time

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.cred.credentials import IUsernamePassword
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from relaymail import clock, dispatch, logobserver
from relaymail.auth.checker import make_portal
from relaymail.auth.passwords import PasswordFileError
from relaymail.config import ConfigError, load_config, read_config_text
from relaymail.config_warnings import config_warnings
from relaymail.file_limit import raise_file_limit
from relaymail.metrics import instruments
from relaymail.lifecycle import OrderlyService
from relaymail.policy.loader import build_hooks
from relaymail.process.launch import Launch
from relaymail.process.reload import reread
from relaymail.policy.recipients import Policy
from relaymail.queue.control import listen_control
from relaymail.queue.intake import NotifyingQueue
from relaymail.queue.layout import UnsafeSpool, check_root_owned, hand_over, trusted_path
from relaymail.queue.lock import SpoolLock
from relaymail.queue.spool import Spool
from relaymail.queue.usable import SpoolUnusable, check_spool_path
from relaymail.smtp import endpoint_string
from relaymail.smtp.authentication import RESERVED_HASHES, Authenticator
from relaymail.smtp.limits import ConnectionGate
from relaymail.smtp.server import SMTPFactory
from relaymail.smtp.sessions import EndSessions, OpenSessions
from relaymail.smtp.tls import ServerTLS, TLSFileError, implicit_tls_endpoint

log = Logger(namespace="relaymail")

# Command-line options that override one config key each.
_OVERRIDES = {
    "listen": ("server", "listen"),
    "hostname": ("server", "hostname"),
    "spool": ("queue", "path"),
    "smarthost": ("delivery", "smarthost"),
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the relaymail SMTP relay.  Settings come from the INI file named by "
        "--config (see etc/relaymail.ini for every key and its default); the other "
        "options override single keys of that file.")
    optParameters = [
        ["config", "c", None, "Configuration file (INI). Without it, the built-in defaults."],
        ["listen", "l", None,
         "Twisted server endpoint to listen on, e.g. tcp:2525:interface=127.0.0.1; "
         "overrides [server] listen."],
        ["hostname", None, None, "Name used in the greeting and Received: headers; "
                                 "overrides [server] hostname."],
        ["spool", None, None, "Queue directory; overrides [queue] path."],
        ["smarthost", None, None,
         "Next hop for all mail: [host]:port (no MX lookup) or host:port (MX of host); "
         "overrides [delivery] smarthost."],
    ]
    optFlags = [
        ["list-plugins", None,
         "Print every plugin found (built-in and [plugins] path of --config): where it "
         "comes from, the hooks it serves, where this config enables it, its description "
         "and whether it blocks; then exit without starting."],
    ]

    def opt_version(self):
        """Print relaymail's version (and Twisted's), and exit."""
        import twisted
        import relaymail
        print(f"relaymail {relaymail.__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

    def postOptions(self):
        if self["list-plugins"]:
            _list_plugins(self)
        logobserver.use_for(getattr(self, "parent", None))


def _list_plugins(options):
    """``--list-plugins``: print the listing and exit, before twistd starts
    anything (relaymail.policy.listing)."""
    from relaymail.policy.listing import listing
    try:
        text = read_config_text(options["config"]) if options["config"] else None
        settings = load_config(options["config"], _overrides(options), text)
        sys.stdout.write(listing(settings))
    except ConfigError as error:
        raise SystemExit(f"relaymail: {error}")
    sys.stdout.flush()
    raise SystemExit(0)


def _overrides(options):
    return {key: options[name] for name, key in _OVERRIDES.items() if options[name] is not None}


class ControlService(service.Service):
    """The queue tool's socket, QUEUE/control, while the daemon runs."""

    def __init__(self, reactor, spool_path, manager):
        self._args = (reactor, spool_path, manager)
        self._port = None

    def startService(self):
        super().startService()
        self._port = listen_control(*self._args)

    def stopService(self):
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()


class LockPidService(service.Service):
    """Keeps the spool lock for the life of the process, and writes the pid
    into it once twistd has forked, so the queue tool names the right one."""

    def __init__(self, lock):
        self.lock = lock

    def startService(self):
        super().startService()
        self.lock.write_pid()


class ThreadPoolService(service.Service):
    """A thread pool of its own for one kind of work, started and stopped
    with the daemon."""

    def __init__(self, pool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


def build_service(settings, reactor=None, launch=None):
    """The whole relay in this one process (``[server] workers = 0``), as
    a MultiService, from validated settings; ``launch`` (the config file
    and overrides they came from) lets a SIGHUP read the plugins' keys
    again.

    :raise ConfigError: for a plugin problem, or a spool another daemon owns.
    """
    if reactor is None:
        from twisted.internet import reactor
    raise_file_limit(settings)
    instruments.enable(bool(settings.metrics.listen))
    hooks = build_hooks(settings)
    policy = Policy.from_hooks(hooks, settings, reactor=reactor)
    # Before the lock, so a file that will not load leaves no spool behind.
    _check_tls_and_passwords(settings)
    lock = take_lock(settings)
    spool = Spool(settings.queue.path, reactor=reactor, min_free=settings.queue.min_free,
                  commit_delay=settings.queue.commit_delay)
    top = RelayService(settings, lock)
    # Started in this order: the queue is recovered before the scheduler
    # reads it and before any listener accepts mail (and stopped in the
    # other: relaymail.lifecycle).
    spool.setServiceParent(top)
    from relaymail.delivery.engine import delivery_scheduler
    scheduler = delivery_scheduler(settings, reactor, spool, policy, hooks=hooks)
    scheduler.setServiceParent(top)
    for companion in scheduler.companions:
        companion.setServiceParent(top)
    ControlService(reactor, settings.queue.path, scheduler).setServiceParent(top)
    LockPidService(lock).setServiceParent(top)
    queue = NotifyingQueue(spool, scheduler.message_queued)
    sessions = OpenSessions(reactor)
    spool.expect_commits_from(sessions.transactions)
    listeners = []
    factories = inbound_factories(settings, reactor, top, policy, queue, sessions=sessions)
    SingleProcessReload(reactor, settings, factories, policy,
                        scheduler.transports.registry, launch).setServiceParent(top)
    for (key, description, _options), factory in zip(listener_specs(settings), factories):
        listener = StreamServerEndpointService(listen_endpoint(settings, reactor, key, description),
                                               factory)
        # A port we cannot bind stops start-up instead of being logged and ignored.
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
        listeners.append(listener)
    EndSessions(listeners, sessions).setServiceParent(top)
    if settings.metrics.listen:
        from relaymail.metrics.delivery_side import DeliveryGauges
        from relaymail.metrics.queue_view import QueueView
        from relaymail.metrics.web import MetricsService, single_process_status
        DeliveryGauges(scheduler, reactor, time.time).setServiceParent(top)
        MetricsService(settings, reactor, single_process_status(time.monotonic()),
                       QueueView(spool)).setServiceParent(top)
    return top


class RelayService(OrderlyService):
    """The top of the service tree: an orderly stop (relaymail.lifecycle),
    and a start that fails on a port it cannot bind says so in one line,
    leaving neither the lock's pid nor a spool made for nothing."""

    def __init__(self, settings, lock):
        super().__init__(settings.server.shutdown_grace)
        self._settings = settings
        self._lock = lock
        self.pidfile = None         # twistd's, set by makeService

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            self._lock.release()
            self._lock.remove_if_spool_is_new()
            _remove_our_pidfile(self.pidfile)
            raise SystemExit(f"relaymail: {_cannot_listen(self._settings, error)}")


def _remove_our_pidfile(path):
    """twistd wrote its pid file before the start failed, and removes it
    only after a run: remove it if it still names us."""
    if not path:
        return
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def _cannot_listen(settings, error):
    """The one line for a port that cannot be bound, naming its key."""
    reason = error.socketError
    why = getattr(reason, "strerror", None) or str(reason)
    hint = {errno.EADDRINUSE: "another server has that port (ss -ltnp shows which)",
            errno.EACCES: "ports below 1024 need root (start as root with --uid) or "
                          "CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "no interface of this host has that address"}.get(
        getattr(reason, "errno", None))
    listeners = [("server", key, description) for key, description, _ in listener_specs(settings)]
    if settings.metrics.listen:
        listeners.append(("metrics", "listen", settings.metrics.listen))
    for section, key, description in listeners:
        if _endpoint_port(description) == str(error.port):
            where = ConfigError(settings.source, section, key,
                                f"cannot listen on {description}: {why}"
                                + (f"; {hint}" if hint else ""))
            return str(where)
    return f"cannot listen on {error.interface or '*'}:{error.port}: {why}"


def _endpoint_port(description):
    """The port of a ``tcp:2525:...`` style string (the first positional
    field after the type, or ``port=``), or None."""
    port = endpoint_string.options(endpoint_string.fields(description)).get("port", "")
    return port.strip() or None


class SingleProcessReload(service.Service):
    """SIGHUP with ``[server] workers = 0``: there are no workers to
    replace (relaymail.process.reload), so the files that renew while a
    relay runs are read again in place -- the TLS certificates and keys and
    the password file -- each keeping its old contents if the new ones do
    not load, and the plugins are built again from the config file as it
    is now (``[plugins]`` and ``[plugin:*]``, their tables read afresh),
    the old ones kept if the file or the new ones do not load; other
    changes to the config need a restart, and a line says so."""

    def __init__(self, reactor, settings, factories, policy=None, transports=None, launch=None):
        self._transports = transports   # the scheduler's TransportRegistry
        self._launch = launch
        self._reactor = reactor
        self._settings = settings
        self._factories = factories
        self._policy = policy

    def startService(self):
        super().startService()
        import signal
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))

    def _plugin_settings(self):
        """The settings to build the plugins from: the config file's now.

        :raise ConfigError: the file no longer validates."""
        if self._launch is None or self._launch.config is None:
            return self._settings
        return reread(self._launch, self._settings)[1]

    def reload(self):
        tls, checkers = [], []
        for factory in self._factories:
            own = getattr(factory, "server_tls", None)     # an ssl: listener's
            if own is not None and own not in tls:
                tls.append(own)
            factory = getattr(factory, "wrappedFactory", factory)
            if factory.tls is not None and factory.tls not in tls:
                tls.append(factory.tls)
            if factory.auth is not None:
                checker = factory.auth._portal.checkers.get(IUsernamePassword)
                if checker is not None and checker not in checkers:
                    checkers.append(checker)
        problems = []
        for item in tls:
            try:
                item.reload()
            except TLSFileError as error:
                problems.append(str(_tls_problem(self._settings, error)))
        for checker in checkers:
            try:
                checker.reload()
            except PasswordFileError as error:
                problems.append(str(_passwords_problem(self._settings, error)))
        if self._policy is not None:
            try:
                hooks = build_hooks(self._plugin_settings())
                if self._transports is not None:
                    self._transports.use_site(hooks["transports"])
                self._policy.use_hooks(hooks)
            except ConfigError as error:
                problems.append(str(error))
        for problem in problems:
            log.error("SIGHUP: kept the old contents: {problem}", problem=problem)
        log_warnings(self._settings, "SIGHUP: ")
        log.info(
            "SIGHUP: TLS certificates, the password file and the plugins' tables read again; "
            "with [server] workers = 0 changes to {config} outside [plugins] and [plugin:*] "
            "need a restart",
            config=self._settings.source)


def build_master(settings, options, launch, reactor=None):
    """The master of ``[server] workers`` inbound and ``[delivery] workers``
    delivery processes (relaymail.process.master), with the pid in the
    spool lock and the plugins checked here first, so that a plugin that
    cannot load stops start-up with one line rather than a worker loop."""
    from relaymail.process.master import Master
    if reactor is None:
        from twisted.internet import reactor
    raise_file_limit(settings)
    instruments.enable(bool(settings.metrics.listen))
    check_files(settings)
    lock = take_lock(settings)
    top = RelayService(settings, lock)
    LockPidService(lock).setServiceParent(top)
    master = Master(settings, lock, launch,
                    logobserver.logs_lines_to_stdout(getattr(options, "parent", None)), reactor)
    if settings.metrics.listen:
        # Started before the master: its directory must exist when the
        # first worker starts.
        from relaymail.metrics.queue_view import QueueView
        from relaymail.metrics.rundir import RunDirectory
        from relaymail.metrics.web import MetricsService, master_status
        master.metrics_dir = RunDirectory(settings.metrics.directory)
        MetricsService(settings, reactor, master_status(master, master.metrics_dir),
                       QueueView(Spool(settings.queue.path, reactor=reactor)),
                       master.metrics_dir).setServiceParent(top)
    master.setServiceParent(top)
    return top


def check_files(settings):
    """Load what a worker's start loads from files -- the plugins and their
    tables, the TLS keys and certificates ([tls] and each ``ssl:``
    listener's), the password file -- and throw it
    away: the master does it, and a worker as the ``--uid`` user, so that a
    file one of them cannot read stops start-up with one line.

    :raise ConfigError: naming the file, section and key that failed.
    """
    hooks = build_hooks(settings)
    if hooks["transports"]:
        # A site transport named like another stops start-up here, not in
        # each delivery worker.  Only then: the import of the delivery
        # side costs the master 0.07 s before it starts any worker.
        from relaymail.delivery.transports import TransportRegistry
        TransportRegistry(None, settings, hooks["transports"])
    _check_tls_and_passwords(settings)
    _check_metrics_directory(settings)


def _check_metrics_directory(settings):
    from relaymail.metrics.rundir import foreign_files
    if not (settings.metrics.listen and settings.metrics.directory):
        return
    try:
        foreign = foreign_files(settings.metrics.directory)
    except OSError as error:
        raise ConfigError(settings.source, "metrics", "directory",
                          f"{settings.metrics.directory}: {error.strerror}")
    if foreign:
        raise ConfigError(settings.source, "metrics", "directory",
                          f"{settings.metrics.directory} holds {foreign[0]}, which is not a "
                          "relaymail metrics file: give the metrics a directory of their own")


def _check_tls_and_passwords(settings):
    """check_files() but for the plugins."""
    _server_tls(settings)
    if settings.server.submission_listen:
        _server_tls(settings, for_passwords=True)
    from twisted.internet import reactor
    for key, description, _ in listener_specs(settings):
        if is_implicit_tls(description):
            _implicit_tls(settings, reactor, key, description)
    if settings.auth.passwords:
        try:
            make_portal(settings.auth.passwords)
        except PasswordFileError as error:
            raise _passwords_problem(settings, error)


def _check_workers_can_start(launch, uid, gid):
    """Workers run as the ``--uid`` user and read the files the config
    names themselves: refuse to start, in one line, when one of them cannot
    (rather than restart a worker that fails for ever)."""
    from relaymail.process.master import WorkersCannotStart, check_workers_can_start
    try:
        check_workers_can_start(launch, uid, gid)
    except WorkersCannotStart as error:
        raise SystemExit(f"relaymail: {error}; the workers run as that user: let it read what "
                         f"they need, or set [server] workers = 0 (one process)")


def _check_spool_path(settings):
    """A spool that cannot be made or written where [queue] path says, as
    one line naming the key, before anything is made there."""
    try:
        check_spool_path(settings.queue.path)
    except SpoolUnusable as error:
        raise ConfigError(settings.source, "queue", "path", str(error)) from None


def log_warnings(settings, prefix=""):
    """One warning line for each thing in the settings that works but may
    not for long (relaymail.config_warnings)."""
    for line in config_warnings(settings):
        log.warn("{prefix}{warning}", prefix=prefix, warning=line)


def take_lock(settings):
    """The spool lock, held; ConfigError when another relaymail has it, or
    when the lock cannot be made (a spool that changed since
    :func:`_check_spool_path`)."""
    lock = SpoolLock(settings.queue.path)
    try:
        acquired = lock.acquire()
    except OSError as error:
        raise ConfigError(settings.source, "queue", "path",
                          f"cannot lock {lock.lock_path}: {error.strerror or error}") from None
    if not acquired:
        raise ConfigError(settings.source, "queue", "path",
                          f"{settings.queue.path} is in use by another relaymail")
    return lock


def listener_specs(settings):
    """Every listener as ``(config key, endpoint description, factory
    options)``, in one fixed order: the master binds them in this order and
    an inbound worker builds its factories in the same one."""
    return (
        [("listen", description, {}) for description in settings.server.listen]
        + [("submission_listen", description, {"submission": True})
           for description in settings.server.submission_listen]
        + [("proxy_listen", description, {"proxy": True})
           for description in settings.server.proxy_listen])


def is_implicit_tls(description):
    """Whether a listener is TLS from the first byte (an ``ssl:``
    endpoint, port 465 style)."""
    return description.split(":", 1)[0].lower() == "ssl"


def listen_endpoint(settings, reactor, key, description):
    """The server endpoint to bind for one listener (for ``ssl:``, the
    plain TCP one: the factory does the TLS)."""
    if is_implicit_tls(description):
        return _implicit_tls(settings, reactor, key, description)[0]
    described = endpoint_string.with_backlog(description, settings.server.listen_backlog)
    return endpoints.serverFromString(reactor, described)


def inbound_factories(settings, reactor, top, policy, queue, shared=None, sessions=None):
    """One SMTP factory per listener of :func:`listener_specs`, in order;
    services they need (the scrypt pool) are added to ``top``.

    :param shared: an inbound worker's SharedLimits
        (relaymail.process.shared_counts), so that the connection and AUTH
        limits hold for all workers together.
    :param sessions: the process's relaymail.smtp.sessions.OpenSessions."""
    # STARTTLS with the broad list for MTAs, with the strict one where
    # clients log in to send (relaymail.smtp.tls).
    tls = _server_tls(settings)
    submission_tls = (_server_tls(settings, for_passwords=True)
                      if settings.server.submission_listen else None)
    gate = ConnectionGate(settings, reactor,
                          shared=shared and shared.connections,
                          rates=shared and shared.connection_rates)
    auth = _authenticator(settings, reactor, top, gate.key,
                          windows=shared and shared.auth_attempts)
    common = dict(reactor=reactor, gate=gate, auth=auth, sessions=sessions)
    factories = []
    for key, description, options in listener_specs(settings):
        implicit_tls = is_implicit_tls(description)
        factory = SMTPFactory(settings, policy, queue, implicit_tls=implicit_tls,
                              tls=submission_tls if options.get("submission") else tls,
                              **common, **options)
        if implicit_tls:
            factory = _implicit_tls(settings, reactor, key, description, factory)[1]
        factories.append(factory)
    return factories


def _server_tls(settings, for_passwords=False):
    if not settings.tls.certificate:
        return None
    try:
        return ServerTLS(settings.tls.certificate, settings.tls.private_key,
                         for_passwords=for_passwords)
    except TLSFileError as error:
        raise _tls_problem(settings, error)


def _tls_problem(settings, error):
    """A TLSFileError as the ConfigError naming its [tls] key."""
    return ConfigError(settings.source, "tls", error.key, error.problem)


def _passwords_problem(settings, error):
    """A PasswordFileError as the ConfigError naming [auth] passwords."""
    return ConfigError(settings.source, "auth", "passwords", str(error))


def _implicit_tls(settings, reactor, key, description, factory=None):
    """The TCP endpoint and TLS-wrapped factory for an ``ssl:`` listener,
    with relaymail's TLS options rather than those Twisted's parser would
    give it (the cipher list where passwords travel).  A problem names the
    listener as written, without the backlog= added here."""
    described = endpoint_string.with_backlog(description, settings.server.listen_backlog)
    try:
        endpoint, server_tls = implicit_tls_endpoint(reactor, described)
    except (ValueError, TLSFileError) as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(settings.source, "server", key, f"{description}: {problem}")
    return endpoint, factory and _ImplicitTLSFactory(server_tls, factory)


class _ImplicitTLSFactory(TLSMemoryBIOFactory):
    """TLS from the first byte, keeping its ServerTLS at hand for SIGHUP."""

    def __init__(self, server_tls, factory):
        super().__init__(server_tls, False, factory)
        self.server_tls = server_tls


def _authenticator(settings, reactor, top, client_key, windows=None):
    if not settings.auth.passwords:
        return None
    # The limit is the relay's: shared among the inbound workers, so that
    # the 32 MiB buffers alive at once stay what the setting says.
    limit = max(1, settings.auth.max_concurrent_hashes // max(1, settings.server.workers))
    # scrypt gets threads of its own, as many as may hash at once (the
    # shared slots and the believed clients' reserve), so it never waits
    # behind (or holds up) other work in the reactor's pool, and the
    # Authenticator's count of hashes in progress is the number of 32 MiB
    # buffers alive.
    pool = ThreadPool(0, limit + RESERVED_HASHES, "relaymail-scrypt")
    try:
        portal = make_portal(settings.auth.passwords, threadpool=pool, reactor=reactor)
    except PasswordFileError as error:
        raise _passwords_problem(settings, error)
    ThreadPoolService(pool).setServiceParent(top)
    return Authenticator(portal, settings.auth.failure_delay, reactor, max_hashes=limit,
                         attempts_per_minute=settings.auth.attempts_per_minute, key=client_key,
                         windows=windows)


def _run_as(options):
    """The (uid, gid) twistd will switch to after binding, or None."""
    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None or os.geteuid() != 0:
        return None
    return uid, gid if gid is not None else -1


def makeService(options):
    from twisted.internet import reactor
    clock.run_steadily(reactor)
    dispatch.dispatch_plainly(reactor)
    try:
        # Read once: the workers get this text and this directory, so they
        # check the settings the master checked, whatever the file or
        # twistd's --rundir do after.
        launch = Launch(options["config"], _overrides(options),
                        read_config_text(options["config"]) if options["config"] else None,
                        os.getcwd())
        settings = load_config(launch.config, launch.overrides, launch.config_text)
        logobserver.use_format(settings.log.format)
        _check_spool_path(settings)
        owner = _run_as(options)
        if owner is not None:
            # Before root makes or opens anything in there: a spool the
            # relay user could swap for a link is refused outright.
            spool = trusted_path(settings.queue.path)
        elif os.geteuid() == 0:
            # Root stays root: the spool must be root's, and so must every
            # directory on the way to it, or whoever owns one could swap
            # the spool for one of their own while the relay runs.
            check_root_owned(settings.queue.path)
            trusted_path(settings.queue.path, spool_stays_root=True)
        if settings.server.workers:
            top = build_master(settings, options, launch)
        else:
            top = build_service(settings, launch=launch)
        if owner is not None:
            # The spool and its lock are made while twistd is still root
            # (to bind port 25); the user the relay will run as gets them,
            # each entry checked against the layout, no link followed.
            hand_over(spool, *owner)
            if settings.server.workers:
                _check_workers_can_start(launch, *owner)
        top.pidfile = (getattr(options, "parent", None) or {}).get("pidfile")
        log_warnings(settings)
        # Here, in the master (or the one process): once for the relay,
        # not once per worker.
        from relaymail.policy.listing import enabled_line
        log.info("{line}", line=enabled_line(settings))
        return top
    except (ConfigError, UnsafeSpool) as error:
        # twistd would print a traceback; a bad config deserves one line.
        raise SystemExit(f"relaymail: {error}")
