# Everything runs from .venv, made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find relaymail twisted -name '*.py') setup.cfg pyproject.toml

# Commands the tests run, as COMMAND or COMMAND:DEBIAN-PACKAGE: the real
# clients the interoperability tests drive (tests/interop/: swaks, msmtp,
# curl, and nodemailer, a node module Debian puts in /usr/share/nodejs,
# named by a file of it; postfix, run as private instances by
# tests/postfix_server.py, with Dovecot's SASL below), ss that shows a listener's
# backlog, HAProxy in front of two relays (tests/test_haproxy_pair.py),
# systemd-analyze that verifies etc/relaymail.service
# (tests/test_systemd_unit.py), and the headless browser the status page is
# checked in (chromium, and chromedriver, which selenium drives), and the
# Redis the ratelimit plugin's shared counters are tested against
# (tests/test_ratelimit_plugin.py).  haproxy lives in /usr/sbin, which is
# not on every user's PATH, so that is looked in too.  The lmtp transport
# is tested against Dovecot's LMTP server (tests/test_lmtp.py): its master
# is /usr/sbin/dovecot (dovecot-core), the LMTP service a program outside
# any PATH, so named by its absolute path, which command -v takes as well.
# The sql plugin is tested against a real PostgreSQL (tests/test_sql_plugin.py),
# whose server lives in /usr/lib/postgresql/VERSION/bin: a wildcard there is
# looked for as a file pattern.  libfaketime steps the wall clock under a
# running relay (tests/test_clock_steps.py).
TEST_TOOLS := swaks msmtp curl node:nodejs /usr/share/nodejs/nodemailer/package.json:node-nodemailer \
	postfix '/usr/lib/*/libidn.so.12:libidn12' ss:iproute2 haproxy systemd-analyze:systemd chromium \
	chromedriver:chromium-driver redis-server dovecot:dovecot-core \
	/usr/lib/dovecot/lmtp:dovecot-lmtpd '/usr/lib/postgresql/*/bin/postgres:postgresql' \
	'/usr/lib/*/faketime/libfaketime.so.1:faketime'

# Exim conflicts with Postfix as the installed MTA (both are Debian's
# mail-transport-agent), so tests/interop/exim.py runs Debian's
# exim4-daemon-light from its unpacked package, kept here; libidn12 above
# is the one library it needs that the machine may lack.
EXIM := .cache/exim4/usr/sbin/exim4

.PHONY: install run test test-tools reference clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	# twistd finds plugins through twisted/plugins/dropin.cache: rebuild it
	# now rather than on first start.
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

run: install
	mkdir -p var
	$(VENV)/bin/twistd -n --pidfile= relaymail --config etc/relaymail.ini

# The tests start hundreds of relays and tools from this checkout
# (PYTHONPATH): compiled once here, as pip compiles an installed copy,
# rather than by every one of them where PYTHONDONTWRITEBYTECODE is set
# (a quarter of their CPU: user time of tests/test_processes.py 29.8 s
# against 22.1 s).
test: install test-tools
	$(PY) -m compileall -q relaymail twisted
	$(PY) -m pytest -q

test-tools:
	@missing=""; for entry in $(TEST_TOOLS); do tool=$${entry%%:*}; package=$${entry#*:}; \
		command -v $$tool >/dev/null || test -x /usr/sbin/$$tool || \
		ls $$tool >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "the tests need$$missing: sudo apt-get install$$missing" >&2; exit 1; \
		fi; \
	fi
	@test -x $(EXIM) || { rm -rf .cache/exim4 && mkdir -p .cache/exim4/deb && cd .cache/exim4/deb && \
		{ apt-get download -qq exim4-daemon-light 2>/dev/null || \
		  { apt-get update -qq && apt-get download -qq exim4-daemon-light; }; } && \
		cd ../../.. && dpkg -x .cache/exim4/deb/exim4-daemon-light_*.deb .cache/exim4; }

# README.rst's configuration reference, from relaymail/config.py's schema
# and etc/relaymail.ini's comments (tests/test_reference.py checks it).
reference: install
	$(PY) -m relaymail.tools.reference --update

clean:
	rm -rf $(VENV) var build *.egg-info .cache
