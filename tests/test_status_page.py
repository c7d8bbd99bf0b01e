"""The status page at ``/`` of ``[metrics] listen``: fetched over HTTP from
the real relay, and rendered in a real headless chromium (Debian's
chromium and chromium-driver, driven by selenium; ``make test-tools``
installs them)."""

import html
import re
import shutil
import smtplib
import time
import urllib.error
import urllib.request

import pytest

from tests.nexthop import NextHop
from tests.test_delivery import send
from tests.test_metrics import metrics_relay, wait_for_scrape, value
from tests.test_processes import wait_for_worker

HOSTILE_SENDER = '"<script>alert(1)</script>"@example.org'
HOSTILE_ERROR = '4.2.0 <b>busy</b> & "later"'


@pytest.fixture
def nexthop():
    server = NextHop()
    server.rcpt_reply = lambda address: ((451, HOSTILE_ERROR) if "later@" in address
                                         else (250, "2.1.5 Ok"))
    yield server
    server.stop()


def fetch(relay, path="/", method="GET"):
    """(status, headers, body) of one request to the metrics listener."""
    request = urllib.request.Request(f"http://127.0.0.1:{relay.metrics_port}{path}",
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def queue_mail(relay, nexthop):
    """One message delivered, one from a hostile sender deferred with a
    hostile error; the deferred one's queue id."""
    send(relay, "alice@example.org", ["bob@example.com"])
    nexthop.wait_for(1)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.docmd(f"MAIL FROM:<{HOSTILE_SENDER}>")[0] == 250
        assert client.rcpt("later@example.com")[0] == 250
        code, text = client.data(b"Subject: x\r\n\r\nx\r\n")
    assert code == 250
    queue_id = re.search(rb"queued as ([0-9A-Z]+)", text).group(1).decode()
    # The delivery worker has tried it, published its count and its last
    # error, and the master's listing has it.
    wait_for_scrape(relay, lambda samples: (
        value(samples, "relaymail_queue_messages", state="deferred") == 1
        and value(samples, "relaymail_queue_oldest_message_age_seconds") > 0),
        "the deferred message")
    return queue_id


def rows(page, table_id):
    """The cells of each row of the table ``table_id``, unescaped."""
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S).group(1)
    return [[html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table) if "<td>" in row]


def bar_counts(page):
    return [int(count) for count in re.findall(r'<rect class="bar"[^>]*data-count="(\d+)"', page)]


def test_the_page_shows_the_queue_the_errors_and_the_workers_all_escaped(tmp_path, nexthop):
    relay = metrics_relay(tmp_path, nexthop, workers=2, metrics={"status_refresh": "7"}).start()
    try:
        queue_id = queue_mail(relay, nexthop)
        # Nothing started after the start: the first pid of each.
        pids = {name: wait_for_worker(relay, name) for name in
                ("inbound.1", "inbound.2", "delivery.0")}
        status, headers, page = fetch(relay)
    finally:
        relay.stop()
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh" content="7">' in page
    # Queue data came from outside: none of it is markup.
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;busy&lt;/b&gt; &amp; &quot;later&quot;" in page
    assert rows(page, "queue") == [["active", "0"], ["deferred", "1"], ["hold", "0"]]
    [oldest] = rows(page, "oldest")
    assert oldest[:3] == [queue_id, "active", f"<{HOSTILE_SENDER}>"]
    assert re.fullmatch(r"\d+s", oldest[3])
    assert oldest[4] == f"451 {HOSTILE_ERROR} (from 127.0.0.1[127.0.0.1]:{nexthop.port})"
    [error] = rows(page, "errors")
    assert error[0] == f"[127.0.0.1]:{nexthop.port}"
    assert re.fullmatch(r"\d+s ago", error[1])
    assert error[2] == f"451 {HOSTILE_ERROR}"
    assert [row[:3] for row in rows(page, "workers")] == [
        [name, name.split(".")[0], str(pid)] for name, pid in pids.items()]
    # 60 minutes, the one under way last, with the delivery in it.
    assert bar_counts(page) == [0] * 59 + [1]


def test_the_page_is_read_only(tmp_path, nexthop):
    relay = metrics_relay(tmp_path, nexthop, workers=0).start()
    try:
        for method in ("POST", "PUT", "DELETE"):
            status, headers, _ = fetch(relay, "/", method)
            assert status == 405, method
            assert set(headers["Allow"].split(", ")) == {"GET", "HEAD"}
            assert fetch(relay, "/metrics", method)[0] == 405
        status, headers, body = fetch(relay, "/", "HEAD")
        assert (status, body) == (200, "")
        assert fetch(relay, "/nothing-here")[0] == 404
        status, _, page = fetch(relay)
    finally:
        relay.stop()
    assert status == 200
    [process] = rows(page, "workers")
    assert process[:3] == ["relaymail", "single process", str(relay.process.pid)]
    assert rows(page, "queue") == [["active", "0"], ["deferred", "0"], ["hold", "0"]]
    assert bar_counts(page) == [0] * 60


@pytest.fixture
def browser():
    # Never skipped: a missing browser is a broken test set-up, and says so.
    for tool, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        assert shutil.which(tool), f"{tool} is missing: apt-get install {package} (make test-tools)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(10)
    yield driver
    driver.quit()


def test_a_browser_renders_the_chart_and_the_page_reloads_itself(tmp_path, nexthop, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    relay = metrics_relay(tmp_path, nexthop, workers=2, metrics={"status_refresh": "1"}).start()
    try:
        queue_mail(relay, nexthop)
        browser.get(f"http://127.0.0.1:{relay.metrics_port}/")
        assert browser.title == "relaymail status"
        chart = browser.find_element(By.ID, "deliveries")
        assert chart.size["width"] > 0 and chart.size["height"] > 0
        bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        assert [int(bar.get_attribute("data-count")) for bar in bars] == [0] * 59 + [1]
        # The last bar is drawn, and as tall as the chart's scale allows.
        assert float(bars[-1].get_attribute("height")) > 0
        assert bars[-1].size["height"] > 0
        # The hostile sender is text on the page, not a script that ran.
        assert browser.execute_script("return document.scripts.length") == 0
        assert f"<{HOSTILE_SENDER}>" in browser.find_element(By.ID, "oldest").text
        first = browser.find_element(By.ID, "generated").text
        # A mark on this document: gone once the browser loads the next.
        browser.execute_script("window.relaymailMark = 1")
        started = time.monotonic()
        WebDriverWait(browser, 10, poll_frequency=0.1).until(
            lambda driver: driver.execute_script("return window.relaymailMark === undefined")
            and driver.find_element(By.ID, "generated").text != first)
        assert time.monotonic() - started < 5
        assert browser.current_url == f"http://127.0.0.1:{relay.metrics_port}/"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#deliveries rect.bar")) == 60
    finally:
        relay.stop()
