"""The result values of the plugin contracts (relaymail.interfaces)."""

import pytest

from relaymail.interfaces import Decision, RecipientOutcome, Route


def test_filter_answers_carry_what_the_queue_needs():
    assert Decision.hold("looks odd").kind == "hold"
    assert Decision.hold("looks odd").text == "looks odd"
    assert Decision.discard("spam").kind == "discard"
    redirect = Decision.redirect(["quarantine@example.com"], "suspect")
    assert (redirect.kind, redirect.recipients, redirect.text) == (
        "redirect", ("quarantine@example.com",), "suspect")
    assert all(d.is_final for d in (Decision.hold(), Decision.discard(), redirect))
    assert Decision.FILTER_KINDS == {"hold", "discard", "redirect"}


def test_a_redirect_needs_addresses():
    with pytest.raises(ValueError):
        Decision.redirect([])
    with pytest.raises(ValueError):
        Decision.redirect([b"bytes@example.com"])


def test_header_changes_add_up_and_keep_the_answer():
    first = Decision.NO_OPINION.with_headers(add=[("X-Checked", "yes")], remove=["X-Spam"])
    both = first.with_headers(add=[("DKIM-Signature", "v=1")])
    assert not both.is_final
    assert both.add_headers == (("X-Checked", "yes"), ("DKIM-Signature", "v=1"))
    assert both.remove_headers == ("X-Spam",)
    # The constants themselves are never changed.
    assert Decision.NO_OPINION.add_headers == ()
    assert Decision.ACCEPT.with_headers(add=[("A", "b")]).kind == "accept"
    assert Decision.ACCEPT.with_headers(add=[("A", "b")]) != Decision.ACCEPT


def test_refusals_cannot_change_headers():
    with pytest.raises(ValueError):
        Decision.reject(550, "5.7.1", "no").with_headers(add=[("A", "b")])
    with pytest.raises(ValueError):
        Decision.defer().with_headers(add=[("A", "b")])


def test_routes_and_outcomes_compare_by_value():
    assert Route("lmtp", "/run/dovecot/lmtp") == Route("lmtp", "/run/dovecot/lmtp")
    assert Route("smtp") != Route("smtp", "[mx.example.com]:25")
    assert RecipientOutcome.delivered().kind == "delivered"
    assert RecipientOutcome.bounced("550 5.1.1 no such user", "5.1.1") == RecipientOutcome(
        "bounced", "5.1.1", "550 5.1.1 no such user")
    with pytest.raises(ValueError):
        RecipientOutcome("lost", "4.0.0", "?")
