"""SMTP AUTH: who a client is, checked against a password file.

- :mod:`relaymail.auth.passwords` -- the password file and its scrypt hashes;
- :mod:`relaymail.auth.checker` -- the twisted.cred checker, realm and
  :func:`~relaymail.auth.checker.make_portal`;
- :mod:`relaymail.auth.sasl` -- the PLAIN and LOGIN exchanges, sans I/O.

The SMTP dialogue uses :mod:`~relaymail.auth.sasl` to turn AUTH lines into
credentials and the Portal to check them; nothing here knows about SMTP
beyond the reply codes a failed exchange carries.
"""
