"""The interoperability suite: real mail clients and real MTAs against the
real relay (issue 11).  Every peer is a Debian package that ``make
test-tools`` installs (the Makefile's TEST_TOOLS); a missing one fails its
test with the command that installs it, and nothing skips."""
