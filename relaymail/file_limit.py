"""The open-file limit against what the configured limits need.

Under the common soft limit of 1,024 open files, 600 sessions in DATA (a
socket and a queue file each) ran out, and clients got ``451`` from
EMFILE.  So at start the soft limit is raised to the hard one, and the
relay refuses to start, in one line, when even that cannot hold what
``[limits] connections`` and ``[delivery] max_connections`` may need at
once: better told now than found out under load.
"""

import resource

from twisted.logger import Logger

from relaymail.config import ConfigError

log = Logger(namespace="relaymail")

# Open files the relay may need at once, beside its listeners:
#: An inbound session holds its socket and, from DATA to the final dot,
#: its message file in the queue's tmp/.
FILES_PER_SESSION = 2
#: An outbound connection holds its socket and the message file it sends,
#: and before connecting a UDP socket per DNS query in flight (twisted.names
#: opens one per query; A and AAAA are asked together).
FILES_PER_DELIVERY = 3
#: Everything else: stdin/out/err and the log (4), the spool lock and the
#: control socket with a few queue-tool connections (6), epoll and the
#: reactor's waker pipe (3), the commit thread's record file and
#: directory (2) and 16 spool threads' two each (32), TLS and password
#: files being reloaded, /etc/resolv.conf and /etc/hosts (6), and some
#: slack for Python's own imports and /dev/urandom (11).
FILES_FIXED = 64


def files_needed(settings):
    """Open files the relay may need at once under its configured limits."""
    server = settings.server
    listeners = len(server.listen) + len(server.submission_listen) + len(server.proxy_listen)
    return (FILES_PER_SESSION * settings.limits.connections
            + FILES_PER_DELIVERY * settings.delivery.max_connections
            + FILES_FIXED + listeners)


def raise_file_limit(settings):
    """Raise the soft open-file limit to the hard one; refuse (ConfigError)
    when the limits configured need more than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            # macOS refuses more than OPEN_MAX however high the hard limit;
            # what the soft limit is now is then what we have.
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = files_needed(settings)
    if soft != resource.RLIM_INFINITY and need > soft:
        connections = settings.limits.connections
        outbound = settings.delivery.max_connections
        rest = need - FILES_PER_SESSION * connections - FILES_PER_DELIVERY * outbound
        raise ConfigError(
            settings.source, "limits", "connections",
            f"{connections} connections need up to {need} open files ({FILES_PER_SESSION} "
            f"each, {FILES_PER_DELIVERY} for each of [delivery] max_connections {outbound}, "
            f"{rest} for the queue and listeners) but the open file limit (RLIMIT_NOFILE) "
            f"is {soft}; lower connections or raise the limit (ulimit -n, systemd LimitNOFILE=)")
    # One line at start, so that an administrator sees what was got and
    # what is needed before a busy day shows it.
    log.info("open files: limit {soft} (was {before}, hard limit {hard}); the configured "
             "limits need up to {need}", soft=_shown(soft), before=_shown(before),
             hard=_shown(hard), need=need)


def _shown(limit):
    return "unlimited" if limit == resource.RLIM_INFINITY else limit
