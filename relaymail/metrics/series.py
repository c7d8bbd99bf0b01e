"""Deliveries per minute over the last hour, for the status page's chart.

The master samples the delivered total once a minute and keeps the last
:data:`POINTS`; each bar is the difference between two samples, and the
last bar is the minute under way (the total now, less the last sample),
so a delivery shows at the next page load, not a minute later.
"""

import collections

POINTS = 60
INTERVAL = 60.0


class MinuteSeries:
    def __init__(self, points=POINTS):
        self._points = points
        self._samples = collections.deque(maxlen=points)

    def sample(self, total):
        self._samples.append(total)

    def per_minute(self, total_now):
        """``points`` counts, oldest first; minutes before the first
        sample count 0."""
        samples = list(self._samples) + [total_now]
        counts = [max(0, int(later - earlier)) for earlier, later in zip(samples, samples[1:])]
        counts = counts[-self._points:]
        return [0] * (self._points - len(counts)) + counts
