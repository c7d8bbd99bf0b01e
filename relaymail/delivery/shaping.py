"""Outbound shaping: at most N messages per period to a destination.

An ISP's smarthost that takes 250 messages an hour, or a partner's server
that blocks a sender going faster, must not be sent more; the excess is not
refused or bounced but waits in the queue for its turn, as Postfix's
``default_destination_rate_delay`` spaces deliveries out.  ``[delivery_rates]``
names the destinations: ``smarthost``, or a recipient domain (``.domain``
for its subdomains) as ``[routes]`` does.

Each message a destination is sent takes a slot for the period (a sliding
window: no period holds more than N send times), whether the delivery
succeeds or not, as a remote limit counts connections tried; one slot
however many transactions its recipients there take ([delivery]
recipients_per_transaction).  A message
that finds no free slot reserves the first one that frees after those
already reserved, and is rescheduled for that time with no attempt counted
(relaymail.queue.scheduler).  A backlog of thousands then wakes one message
per slot, not all of them at every slot.

Delivery workers each own a part of the queue, so each gets an equal
share of a limit, rounded down so that together they never pass it: ``N //
workers`` per period, or, with fewer messages than workers, one message
per ``period * workers / N``.
"""

import collections

from relaymail.delivery.routing import route_key


class OutboundRates:
    """The slots of every shaped destination in this process.

    :param rates: ``[delivery_rates]``: key -> ``(count, seconds)``.
    :param share: how many processes split the limits (delivery workers).
    """

    def __init__(self, rates, share=1):
        share = max(1, share)
        self._rates = {key: _share_of(count, period, share)
                       for key, (count, period) in rates.items()}
        self._sent = {}             # key -> deque of send times, oldest first

    def __bool__(self):
        return bool(self._rates)

    def key_for(self, destination, recipient_domain):
        """Which limit a message to ``destination`` for a recipient in
        ``recipient_domain`` counts against, or None when none does."""
        if destination.kind == "smarthost":
            return "smarthost" if "smarthost" in self._rates else None
        return route_key(self._rates, recipient_domain)

    def period(self, key):
        """The period of ``key``'s limit, in seconds."""
        return self._rates[key][1]

    def reserve(self, key, now):
        """Take the first free slot of ``key``: the time the message may go,
        ``now`` when one is free at once.

        The slots taken are kept in time order, future reservations
        included; a new one goes ``period`` after the ``count``-th latest,
        so that no period holds more than ``count`` of them.
        """
        count, period = self._rates[key]
        sent = self._sent.setdefault(key, collections.deque())
        while sent and sent[0] <= now - period:
            sent.popleft()
        when = now if len(sent) < count else max(now, sent[-count] + period)
        sent.append(when)
        return when


def _share_of(count, period, share):
    """One worker's ``(count, period)`` of a limit ``share`` workers split:
    never more in all than the limit (an ISP's 250 an hour is a ceiling)."""
    if count >= share:
        return count // share, period
    return 1, period * share / count
