"""The ``ratelimit`` plugin's counters in Redis, shared by every process
and node that names the same Redis.

Each counted name has a key a bucket, ``PREFIX + name + ":" + bucket``
(``relaymail:ratelimit:messages_per_client:192.0.2.1:29340000``), holding
the events of that bucket (:mod:`relaymail.plugins.ratelimit_counters`
explains the window).  It lives two windows, long enough to be read as
the previous bucket, then Redis expires it: nothing to sweep.

One Lua script reads the current and previous buckets of every name of an
event, and increments the current ones and renews their lifetime only if
none is over its limit.  Redis runs a script alone, so two nodes counting
the same name at the same moment cannot both take its last place, and a
refused event is counted nowhere (an INCR first and a check after would
charge the names that were not over).  The script is sent once and run by
its SHA1 (EVALSHA) after that; redis-py resends it after a Redis restart.
Its keys are in several hash slots, so this is for one Redis (with
replicas or Sentinel), not Redis Cluster.

Buckets are numbered from each node's own clock: a fleet's clocks should
agree (NTP), a skew of a second moving at most a second's share of a
bucket from one bucket to the next.

redis-py blocks, so the plugin that uses these counters declares
``blocking = True`` and runs in relaymail's plugin thread pool; the client
is thread-safe (a pool of connections).
"""

# KEYS: for each name, its current bucket's key then its previous one's.
# ARGV[1]: the previous bucket's weight, ARGV[2]: a key's lifetime in
# milliseconds, ARGV[3]: 1 to count, 0 only to look (a dry run),
# ARGV[3 + i]: the limit of the i-th name.
# Returns the (1-based) number of the first name over its limit, or 0
# once every name is counted.
_TAKE = """
local weight = tonumber(ARGV[1])
local names = #KEYS / 2
for i = 1, names do
  local current = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  if previous * weight + current + 1 > tonumber(ARGV[3 + i]) then
    return i
  end
end
if ARGV[3] == '0' then
  return 0
end
for i = 1, names do
  redis.call('INCR', KEYS[2 * i - 1])
  redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[2])
end
return 0
"""

#: The prefix of every key, so that one Redis can serve other programs
#: (or two relay fleets, given two prefixes).
DEFAULT_PREFIX = "relaymail:ratelimit:"


class CountersUnavailable(Exception):
    """Redis could not be asked: down, unreachable, too slow, refusing."""


class RedisCounters:
    """Counters in the Redis at ``url`` (``redis://host:port/db``,
    ``rediss://`` for TLS, ``unix:///path?db=0``).

    :param window: a :class:`~relaymail.plugins.ratelimit_counters.SlidingWindow`.
    :param prefix: put before every key.
    :param timeout: seconds to wait for a connection or an answer.
    :raise ImportError: when redis-py is not installed.
    :raise ValueError: for a URL redis-py cannot use.

    Nothing is connected here: a Redis that is down at start is met at the
    first message, where ``on_redis_failure`` decides, not at start-up.
    """

    def __init__(self, window, url, prefix=DEFAULT_PREFIX, timeout=1.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self._window = window
        self._prefix = prefix
        self._errors = redis.RedisError
        # One retry, at once, on a broken connection only: a pooled
        # connection to a Redis that has since restarted fails on first
        # use and a new one works.  No retry on a timeout: a Redis that
        # hangs would cost several timeouts a message.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self._script = self._client.register_script(_TAKE)
        # Twice the window, so a bucket is still there to be read as the
        # previous one; a second more for the clocks of a fleet.
        self._lifetime_ms = int(2 * window.window * 1000) + 1000

    def take(self, counts, now, count_them=True):
        """As :meth:`MemoryCounters.take
        <relaymail.plugins.ratelimit_counters.MemoryCounters.take>`.

        :raise CountersUnavailable: when Redis did not answer.
        """
        if not counts:
            return None
        bucket = self._window.bucket(now)
        keys = []
        for count in counts:
            keys.append(f"{self._prefix}{count.name}:{bucket}")
            keys.append(f"{self._prefix}{count.name}:{bucket - 1}")
        args = [repr(self._window.previous_weight(now)), self._lifetime_ms,
                1 if count_them else 0]
        args.extend(count.most for count in counts)
        try:
            over = int(self._script(keys=keys, args=args))
        except self._errors as exc:
            raise CountersUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return counts[over - 1] if over else None

    def close(self):
        """Let go of the connections."""
        self._client.close()

