"""Message contents that break relays, sent through the relay to several
far ends (test_far_end.py, test_exim.py) and compared byte for byte."""

HEADERS = b"From: a@example.org\r\nTo: b@example.net\r\n"

CONTENTS = {
    "utf8_body": HEADERS + "Subject: utf8\r\n\r\nGrüße, ça va? 日本語 ✓\r\n".encode(),
    "line_998": HEADERS + b"Subject: 998\r\n\r\n" + b"x" * 998 + b"\r\nend\r\n",
    "dot_line_998": HEADERS + b"Subject: dot 998\r\n\r\n." + b"y" * 997 + b"\r\nend\r\n",
    "dot_lines": HEADERS + b"Subject: dots\r\n\r\n.\r\n..\r\n. \r\n.x\r\nmid . dle\r\n.\r\n",
    "empty_body": HEADERS + b"Subject: empty\r\n\r\n",
    "headers_only": HEADERS + b"Subject: headers only\r\n",
}
