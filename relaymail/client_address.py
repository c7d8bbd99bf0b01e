"""Who a client is: the name it is counted under, the networks it is in.

The SMTP server's connection and AUTH limits (relaymail.smtp.limits) and
plugins that count clients (relaymail.plugins.ratelimit) must agree on who
one client is, and the server and relaymail-check on whether it is
trusted, so they import this; it knows nothing of the wire.
"""

import functools
import ipaddress


# Cached: asked at every connect, release and AUTH, for the same few
# addresses again and again, and parsing an address costs microseconds.
@functools.lru_cache(maxsize=4096)
def client_key(ip, ipv4_prefix=32, ipv6_prefix=128):
    """The name a client is counted under: its address, or the network of
    the given prefix length that holds it (``2001:db8::/64``).

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack
    socket reports for an IPv4 client) counts as the IPv4 address, so one
    client has one count."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip   # not an IP address (a UNIX socket): counted as given
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    if prefix == address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network((address, prefix), strict=False))


def in_networks(ip, networks):
    """Whether the address ``ip`` (a str) is in one of ``networks``
    (ipaddress networks); an IPv4-mapped IPv6 address as its IPv4 one, and
    anything that is not an IP address (a UNIX socket) in none."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
