"""What a valid configuration still deserves a line about at start.

:func:`relaymail.config.load_config` refuses what could never work; these
are settings that work today and may not tomorrow, each worth one warning
line naming the file, section and key when the relay starts, reloads, or
``relaymail-check config`` reads the file:

* smarthost credentials under ``smarthost_tls = may``: the password is
  sent only over TLS, so the day the smarthost stops offering STARTTLS
  its mail waits in the queue, and under ``may`` the certificate is not
  checked, so whoever answers in its place could collect the password;
* a server certificate ([tls] ``certificate``, or an ``ssl:`` listener's)
  that expires within :data:`EXPIRY_WARNING`.

The master (or the one process) logs them; workers do not, so each shows
once per start.
"""

import datetime

from relaymail.config import (
    ConfigError, TLSFileError, certificate_date, certificate_validity, load_server_certificate)

#: How long before a server certificate expires it is worth a warning:
#: the 30 days before expiry at which certbot renews (renew_before_expiry)
#: and Let's Encrypt sends its expiry mail; a certificate still this close
#: was not renewed.
EXPIRY_WARNING = datetime.timedelta(days=30)


def config_warnings(settings, now=None):
    """One line for each thing worth a warning in ``settings``.

    :param now: an aware datetime, for tests; None is the current time.
    """
    lines = []
    delivery = settings.delivery
    if delivery.smarthost_user is not None and delivery.smarthost_tls == "may":
        lines.append(ConfigError(
            settings.source, "delivery", "smarthost_tls",
            "may with smarthost_user set: the password is sent only over TLS, so while the "
            "smarthost offers no STARTTLS its mail is deferred, and its certificate is not "
            "checked; set verify (or encrypt)"))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for section, key, certificate, private_key in _server_certificates(settings):
        try:
            leaf = load_server_certificate(certificate, private_key).leaf
        except TLSFileError:
            continue    # refused where it is loaded, in its own words
        not_after = certificate_validity(leaf)[1]
        if not_after - now < EXPIRY_WARNING:
            days = (not_after - now).days
            lines.append(ConfigError(
                settings.source, section, key,
                f"the certificate in {certificate!r} expires on {certificate_date(not_after)}, "
                f"in {days} day{'s' if days != 1 else ''}; renew it (SIGHUP reads it again)"))
    return [str(line) for line in lines]


def _server_certificates(settings):
    """(section, key, certificate file, key file) for every certificate
    the relay serves."""
    from relaymail.smtp.tls import implicit_tls_files
    from relaymail.tap import is_implicit_tls, listener_specs
    if settings.tls.certificate is not None:
        yield "tls", "certificate", settings.tls.certificate, settings.tls.private_key
    for key, description, _ in listener_specs(settings):
        if is_implicit_tls(description):
            yield ("server", key, *implicit_tls_files(description))
