"""Outbound delivery: routing (smarthost, routes, MX), the ESMTP client, TLS policy."""
