"""The server's TLS: its certificate and key, the options, and reload.

:class:`ServerTLS` loads the [tls] certificate and key with the same check
that :mod:`relaymail.config` runs at load time, and builds Twisted
``CertificateOptions`` from them: TLS 1.2 at least (RFC 8996 retired 1.0
and 1.1; RFC 8314 4.1 asks for 1.2 or later), and no client certificate
asked for (clients are told apart by AUTH and their address, not by
certificates).

Ciphers, and where passwords travel
===================================

Two lists, as Postfix keeps ``smtpd_tls_ciphers`` apart from
``smtpd_tls_mandatory_ciphers``:

* MTA-to-MTA (``[server] listen``, ``proxy_listen``): Twisted's default
  list, static-RSA and CBC suites included.  RFC 7435 (opportunistic
  security): any encryption beats the plain text an old peer would fall
  back to, and the server's preference picks the strongest suite both
  sides know.
* Where passwords travel (``submission_listen`` and every ``ssl:``
  listener, :data:`PASSWORD_CIPHERS`): TLS 1.3, and for TLS 1.2 only
  ECDHE with AES-GCM or ChaCha20-Poly1305 (RFC 7525 4.2's recommended
  suites): forward secrecy, so a key stolen later does not open recorded
  logins, and AEAD, no CBC (Lucky 13, RFC 7457 2.8).  A client that knows
  none of them gets no handshake.

AUTH may also be offered on a ``listen`` connection after STARTTLS; the
dialogue offers it there only when the suite negotiated is one of
:data:`PASSWORD_CIPHERS` (:func:`fit_for_passwords`), so an old peer keeps
its weak encryption for mail but not for a password.

No session tickets and no session cache, on either list: each connection
makes a full handshake with fresh ECDHE keys.  A ticket key lives as long
as the process and would decrypt every session it resumed; SMTP sessions
are few and long, so resumption would save little.

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
files; :func:`implicit_tls_endpoint` loads them into a :class:`ServerTLS`
of their own, which a reload of the [tls] one does not touch.
"""

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from relaymail.config import TLSFileError, load_server_certificate
from relaymail.smtp import endpoint_check, endpoint_string

# RFC 8996: TLS 1.0 and 1.1 are deprecated; RFC 8314 4.1: 1.2 or later.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

#: OpenSSL cipher string (TLS 1.2) where passwords travel: ephemeral ECDH
#: key exchange, AEAD encryption.  TLS 1.3's suites are all of that kind
#: and stay OpenSSL's defaults.
PASSWORD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


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

    def __init__(self, certificate_path, private_key_path, for_passwords=False):
        """:param for_passwords: offer only :data:`PASSWORD_CIPHERS` (and
            TLS 1.3) rather than Twisted's broad default list."""
        self.certificate_path = certificate_path
        self.private_key_path = private_key_path
        self.for_passwords = for_passwords
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
        ciphers = {}
        if self.for_passwords:
            ciphers["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(
                PASSWORD_CIPHERS)
        options = ssl.CertificateOptions(
            privateKey=pair.private_key,
            certificate=pair.leaf,
            # Sent after the leaf so clients that know only the root can
            # build the path (RFC 8446 4.4.2).
            extraCertChain=list(pair.chain[1:]),
            raiseMinimumTo=MINIMUM_VERSION,
            # Twisted's defaults, said here because the README promises
            # them: no tickets, no session cache (see the module docs).
            enableSessionTickets=False,
            enableSessions=False,
            **ciphers,
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


_fit_for_passwords = None


def fit_for_passwords(cipher_name):
    """Whether the suite ``cipher_name`` (OpenSSL's name, as
    :func:`relaymail.tls_session.negotiated_cipher` gives it) is one passwords may travel
    under: TLS 1.3, or :data:`PASSWORD_CIPHERS`."""
    global _fit_for_passwords
    if _fit_for_passwords is None:
        # Ask OpenSSL what the string means, so that the list and this
        # check cannot disagree.
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_cipher_list(PASSWORD_CIPHERS.encode("ascii"))
        _fit_for_passwords = frozenset(SSL.Connection(context, None).get_cipher_list())
    return cipher_name in _fit_for_passwords




def implicit_tls_endpoint(reactor, description):
    """A TCP endpoint and a :class:`ServerTLS` for an ``ssl:`` endpoint
    string, so that relaymail, not Twisted's parser, sets the TLS options
    of an implicit-TLS listener (port 465, RFC 8314 3.3: where clients log
    in).  Wrap the listener's factory in
    ``TLSMemoryBIOFactory(server_tls, False, factory)``.

    Takes the string as Twisted does: ``ssl:PORT`` then ``key=value``
    options separated by ``:``, a backslash escaping the next character;
    ``privateKey`` defaults to ``server.pem`` and ``certKey`` to
    ``privateKey``, as in Twisted.

    :raise ValueError: for an option not taken, with the reason.
    :raise TLSFileError: for the key or certificate files.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint

    fields = endpoint_string.fields(description)
    if fields[0][1].lower() != "ssl":
        raise ValueError(f"not an ssl: endpoint: {description!r}")
    problem = endpoint_check.problem(description)
    if problem is not None:
        raise ValueError(problem)
    options = endpoint_string.options(fields)
    port = int(options["port"])
    backlog = int(options.get("backlog", "50"))
    server_tls = ServerTLS(*implicit_tls_files(description), for_passwords=True)
    endpoint = TCP4ServerEndpoint(reactor, port, backlog=backlog,
                                  interface=options.get("interface", ""))
    return endpoint, server_tls


def implicit_tls_files(description):
    """The (certificate, private key) files an ``ssl:`` endpoint string
    names: ``privateKey`` defaults to ``server.pem`` and ``certKey`` to
    ``privateKey``, as in Twisted."""
    options = endpoint_string.options(endpoint_string.fields(description))
    private_key = options.get("privateKey", "server.pem")
    return options.get("certKey", private_key), private_key
