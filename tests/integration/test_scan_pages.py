"""A target daemon's map base listed for a source's mirror in pages
(``target.scan`` with ``page_bytes`` and a cursor): one reply past the link's
message cap (a map base of about a million files) failed every mirror of
that connection. A real target daemon, a real control link."""
import os

import pytest

from smirror.daemon.control import Client, RequestError
from smirror.mirror.remote import RemoteReader
from support.daemons import PASSWORD, Node

IDENT = {"source": "pages", "conid": 1}


@pytest.fixture
def target(tmp_path):
    node = Node(tmp_path, "target", {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    node.add_user("repl", "replication")
    node.start()
    yield node
    node.kill()


def _client(node) -> Client:
    client = Client(node.address, timeout=60)
    client.login("repl", PASSWORD)
    return client


def _map_base(tmp_path):
    dst = tmp_path / "replica"
    for d in range(12):
        sub = dst / f"d{d}" / "deeper"
        sub.mkdir(parents=True)
        for f in range(60):
            p = sub / f"file-{f}-\N{LATIN SMALL LETTER E WITH ACUTE}"
            p.write_bytes(b"x" * f)
            os.setxattr(p, "user.tag", os.urandom(40))
        os.symlink("../elsewhere", dst / f"d{d}" / "link")
    (dst / os.fsdecode(b"raw-\xff-name")).write_text("a name that is not UTF-8")
    return dst


def test_a_listing_read_in_pages_is_the_whole_listing(target, tmp_path):
    dst = _map_base(tmp_path)
    whole = _client(target).call("target.scan", map_base=str(dst), xattrs=True, **IDENT)
    assert len(whole) == 12 * 63 + 1            # as an older source reads it: one reply
    reader = RemoteReader(_client(target), str(dst), IDENT)
    reader.SCAN_PAGE_BYTES = 64 * 1024          # the smallest page a target serves
    try:
        reader.read()
        assert reader.pages is not None and reader.pages > 1
        assert reader._rows == whole
        listing = reader.scan()
        assert len(listing.entries) == len(whole) + 1           # and the root
        assert reader.xattrs(b"d3/deeper/file-7-\xc3\xa9")["user.tag"] == \
            os.getxattr(dst / "d3" / "deeper" / "file-7-\N{LATIN SMALL LETTER E WITH ACUTE}", "user.tag")
        assert listing.entries[b"raw-\xff-name"].size == len("a name that is not UTF-8")
    finally:
        reader.close()


def test_a_cursor_is_good_for_its_own_listing_only_until_its_end(target, tmp_path):
    dst = _map_base(tmp_path)
    client = _client(target)
    try:
        first = client.call("target.scan", map_base=str(dst), page_bytes=64 * 1024, **IDENT)
        cursor = first["cursor"]
        assert first["paged"] is True and cursor and first["rows"]
        pages = 1
        while cursor is not None:
            page = client.call("target.scan", map_base=str(dst), cursor=cursor, **IDENT)
            assert not set(page["rows"]) & set(first["rows"])
            last, cursor, pages = cursor, page["cursor"], pages + 1
        assert pages > 1
        with pytest.raises(RequestError, match="is not a listing in progress"):
            client.call("target.scan", map_base=str(dst), cursor=last, **IDENT)
        with pytest.raises(RequestError, match="is not a listing in progress"):
            client.call("target.scan", map_base=str(dst), cursor="made-up", **IDENT)
        with pytest.raises(RequestError, match="page_bytes must be an integer from 65536"):
            client.call("target.scan", map_base=str(dst), page_bytes=10, **IDENT)
        with pytest.raises(RequestError, match="page_bytes must be an integer"):
            client.call("target.scan", map_base=str(dst), page_bytes="all", **IDENT)
    finally:
        client.close()


def test_listings_left_open_are_bounded_per_user(target, tmp_path):
    from smirror.daemon.scan_pages import MAX_OPEN
    dst = _map_base(tmp_path)
    client = _client(target)
    try:
        cursors = [client.call("target.scan", map_base=str(dst), page_bytes=64 * 1024, **IDENT)["cursor"]
                   for _ in range(MAX_OPEN + 2)]
        # the oldest were dropped to stay within MAX_OPEN; the newest still go on
        with pytest.raises(RequestError, match="is not a listing in progress"):
            client.call("target.scan", map_base=str(dst), cursor=cursors[0], **IDENT)
        assert client.call("target.scan", map_base=str(dst), cursor=cursors[-1], **IDENT)["rows"]
    finally:
        client.close()
