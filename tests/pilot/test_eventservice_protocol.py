"""The event-service line protocol's parser (pilot/eventservice/protocol.py): every message, and
every kind of bad line a payload may write, read as a clear error and never an exception of
another kind."""
from __future__ import annotations

import pytest

from pilot.eventservice import protocol as proto

RID = "7-1234-56-10-1"


def test_messages():
    assert proto.parse("ready\n") == proto.Ready()
    assert proto.parse(f"done {RID} out_10.txt") == proto.Done(RID, "out_10.txt")
    assert proto.parse(f"failed {RID} bad input, sorry") == proto.Failed(RID, "bad input, sorry")
    assert proto.parse(f"FAILED {RID}") == proto.Failed(RID, "")
    assert proto.parse("   ") is None and proto.parse("# a comment") is None
    assert proto.range_line(RID, "f.root", 10, 19, "f.root") == f"range {RID} f.root 10 19 f.root\n"


@pytest.mark.parametrize("line,words", [
    ("ready now", "no arguments"),
    (f"done {RID}", "needs <rangeID> <output file>"),
    (f"done {RID} ../../etc/passwd", "refusing"),
    (f"done {RID} /abs/path", "refusing"),
    ("done 1-2-3 out", "not an event range ID"),
    ("done 1-2-3-4-x out", "not an event range ID"),
    ("failed", "needs <rangeID>"),
    ("rm -rf /", "unknown message"),
])
def test_bad_lines(line, words):
    with pytest.raises(proto.ProtocolLine, match=words.replace("(", r"\(").replace(")", r"\)")):
        proto.parse(line)


def test_line_buffer_joins_splits_and_caps():
    buf = proto.LineBuffer()
    assert buf.feed(b"rea") == []
    assert buf.feed(b"dy\ndone 1-2-3-4-5 o\nfa") == ["ready", "done 1-2-3-4-5 o"]
    assert buf.feed(b"iled 1-2-3-4-5\n") == ["failed 1-2-3-4-5"]
    out = buf.feed(b"x" * (proto.MAX_LINE + 10))
    assert len(out) == 1 and "longer than" in str(out[0])
    assert buf.feed(b"y" * 100) == []                   # still inside the long line
    assert buf.feed(b"tail\nready\n") == ["ready"]      # its end is dropped, the next is read
    bad = buf.feed(b"\xff\xfe\n")
    assert len(bad) == 1 and "UTF-8" in str(bad[0])
