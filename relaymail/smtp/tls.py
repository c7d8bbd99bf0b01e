"""The server's TLS: its certificate and key, the options, and reload.

:class:`ServerTLS` loads the [tls] certificate and key with the same check
that :mod:`relaymail.config` runs at load time, and builds Twisted
``CertificateOptions`` from them: TLS 1.2 at least (RFC 8996 retired 1.0
and 1.1; RFC 8314 4.1 asks for 1.2 or later), Twisted's default ciphers,
and no client certificate asked for (clients are told apart by AUTH and
their address, not by certificates).

Reload and what to hold on to
=============================

:meth:`ServerTLS.reload` swaps in new options; :meth:`ServerTLS.options`
returns whichever are current.  Anything that lives longer than one
connection -- a factory, a listening port -- should hold the
:class:`ServerTLS` itself and hand *it* to Twisted: it provides
``IOpenSSLServerConnectionCreator``, so Twisted asks it for a fresh
connection object each time, and each new handshake uses the options
current at that moment::

    transport.startTLS(server_tls)                      # STARTTLS
    SSL4ServerEndpoint(reactor, 465, server_tls)        # implicit TLS
    TLSMemoryBIOFactory(server_tls, False, factory)     # over any endpoint

What ``options()`` returns is a snapshot: a caller that keeps it keeps
the old certificate after a reload.  Handshakes already done are not
touched.  ``ssl:`` endpoint strings in ``[server] listen`` name their own
files and are loaded once by Twisted, so they do not follow a reload.
"""

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from relaymail.config import TLSFileError, load_server_certificate

# RFC 8996: TLS 1.0 and 1.1 are deprecated; RFC 8314 4.1: 1.2 or later.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server certificate, its key and the TLS options built from them.

    :param certificate_path: PEM file: the server's certificate, then any
        intermediates.
    :param private_key_path: PEM file holding the unencrypted private key of
        the first certificate (may be the same file).
    :raise TLSFileError: a ValueError whose one-line text says what is
        wrong and whose ``key`` attribute names the [tls] key to blame
        ('certificate' or 'private_key').
    """

    def __init__(self, certificate_path, private_key_path):
        self.certificate_path = certificate_path
        self.private_key_path = private_key_path
        self._options, self._certificate = self._load()

    @property
    def certificate(self):
        """The server's own certificate now served (a ``cryptography``
        ``x509.Certificate``), for logs and tests."""
        return self._certificate

    def options(self):
        """The current ``twisted.internet.ssl.CertificateOptions``.

        A snapshot: see the module documentation for what to hold on to
        so that a reload reaches new connections.
        """
        return self._options

    def reload(self):
        """Read both files again and serve what they hold from the next
        handshake on.

        Meant for SIGHUP after a certificate renewal.  Call it from the
        reactor thread.  Nothing changes unless both files load and match:
        a renewal caught half written keeps the old pair in service.

        :raise TLSFileError: (a ValueError) saying what is wrong.
        """
        self._options, self._certificate = self._load()

    def serverConnectionForTLS(self, tlsProtocol):
        """A new OpenSSL connection for ``tlsProtocol`` with the current
        options (``IOpenSSLServerConnectionCreator``); Twisted calls this
        once per connection."""
        options = self._options
        if IOpenSSLServerConnectionCreator.providedBy(options):
            return options.serverConnectionForTLS(tlsProtocol)
        # Twisted releases whose CertificateOptions only offer getContext()
        # (setup.cfg allows Twisted from 23.10).
        return SSL.Connection(options.getContext(), None)

    def _load(self):
        """Fresh options and the leaf certificate, from the files."""
        pair = load_server_certificate(self.certificate_path, self.private_key_path)
        options = ssl.CertificateOptions(
            privateKey=pair.private_key,
            certificate=pair.leaf,
            # Sent after the leaf so clients that know only the root can
            # build the path (RFC 8446 4.4.2).
            extraCertChain=list(pair.chain[1:]),
            raiseMinimumTo=MINIMUM_VERSION,
        )
        try:
            # Build the OpenSSL context now: OpenSSL's own objections (a key
            # too weak for its security level, say) then come from here,
            # at start-up or reload, not from the first client's handshake.
            options.getContext()
        except SSL.Error as exc:
            raise TLSFileError("certificate", "OpenSSL will not use the certificate "
                               f"in {self.certificate_path!r}: {_reasons(exc)}") from None
        return options, pair.leaf


def _reasons(exc):
    """The reason strings of an OpenSSL error, on one line."""
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    texts = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry]
    return "; ".join(texts) or " ".join(str(exc).split()) or "unknown error"
