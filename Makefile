# Everything runs from .venv, made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find relaymail twisted -name '*.py') setup.cfg pyproject.toml

.PHONY: install run test clean

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

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) var build *.egg-info
