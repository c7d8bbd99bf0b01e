# Everything runs from .venv, made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find relaymail twisted -name '*.py') setup.cfg pyproject.toml

# Real clients the interoperability tests drive (Debian packages), ss
# (package iproute2) that shows a listener's backlog, and the headless
# browser the status page is checked in (chromium, and chromedriver from
# package chromium-driver, which selenium drives).
TEST_TOOLS := swaks msmtp ss chromium chromedriver

.PHONY: install run test test-tools clean

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

test: install test-tools
	$(PY) -m pytest -q

test-tools:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$(echo $$tool | sed -e s/^ss$$/iproute2/ -e s/^chromedriver$$/chromium-driver/)"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "the tests need$$missing: sudo apt-get install$$missing" >&2; exit 1; \
		fi; \
	fi

clean:
	rm -rf $(VENV) var build *.egg-info
