"""TCP settings both sides of the relay use."""


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
