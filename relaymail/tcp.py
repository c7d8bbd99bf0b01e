"""TCP settings and writes both sides of the relay use."""

from twisted.internet import tcp as _tcp


def no_delay(transport):
    """Turn Nagle's algorithm off where the transport is TCP.  SMTP sends
    small writes and waits for the reply to each (a command, the final
    dot): with Nagle on, a small write that follows another still
    unacknowledged waits for the peer's delayed ACK, up to 40 ms on Linux,
    on every message."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass        # closed already, or not a socket after all


def write(transport, data, at_once=True):
    """``transport.write(data)``, but sent now when it can be.

    Twisted's TCP transport buffers every write and sends it when the
    reactor next finds the socket writable: an epoll_ctl(2) to watch for
    that, another to stop, and a turn of the loop, per write.  SMTP in
    lockstep writes one short line and waits for the peer's, so that was
    a quarter of the system calls a message cost an inbound worker here
    (16 epoll_ctl of 67, strace -c; 4 after this).  When nothing is
    buffered ahead of ``data``, it is sent at once; what the socket does
    not take is buffered as before.

    ``at_once=False`` keeps Twisted's buffering: for a reply with more
    pipelined commands still to answer, so that a group's replies leave
    in one write (RFC 2920 3.1).  Anything but a plain socket transport
    (TLS, a wrapper, a pull producer that expects the transport to ask it
    for more) is written the usual way.

    This reads buffer and state attributes of Twisted's FileDescriptor
    (``dataBuffer``, ``_tempDataBuffer``, ``_writeDisconnected``,
    ``_aborting``), not part of its interface: tests/test_tcp_write.py
    pins what it relies on.
    """
    if at_once and _can_send_now(transport):
        sent = transport.writeSomeData(data)
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
        # 0 (EWOULDBLOCK) or an error: the buffered write below sends the
        # rest when it can, or finds the error again and closes as usual.
    transport.write(data)


def _can_send_now(transport):
    # abortConnection() leaves connected set and disconnecting clear until
    # connectionLost runs on a later turn; what is written meanwhile is
    # dropped, so it must not reach the socket here either.
    return (isinstance(transport, _tcp.Connection) and not transport.TLS and transport.connected
            and not transport._aborting
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.dataBuffer and not transport._tempDataBuffer
            and (transport.producer is None or transport.streamingProducer))

