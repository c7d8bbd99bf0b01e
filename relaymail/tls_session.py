"""What a TLS connection negotiated, for the dialogue and the log lines
of both directions (inbound sessions, deliveries)."""

from OpenSSL import SSL


def _handle(transport):
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, SSL.Connection) else None


def negotiated_cipher(transport):
    """The name of the suite a TLS transport negotiated, or None if it has
    none (not TLS, or the handshake is not done)."""
    handle = _handle(transport)
    return handle.get_cipher_name() if handle is not None else None


def negotiated_tls(transport):
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"``, or None as for
    :func:`negotiated_cipher`."""
    handle = _handle(transport)
    cipher = handle.get_cipher_name() if handle is not None else None
    if cipher is None:
        return None
    return f"{handle.get_protocol_version_name()} {cipher}"
