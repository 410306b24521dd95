"""The target's resync requests (smirror.stream.resyncs): a subtree asked
for again and again backs off, exponentially and bounded, and becomes the
connection's error after a number of asks in a row; the first asks go out
at once (the storms converge on them)."""
from smirror.stream.resyncs import ResyncRequests


def _loop(r, root, now):
    """The source serves each resync at once and the subtree fails again
    right after: returns when each ask went out, and the errors said."""
    sent, errors = [], []
    while now < 200:
        if r.ask(root, 1, "fails", now):
            errors.append(r.sent(root, now))
            sent.append(now)
        for due_root, _, _ in r.due(now)[0]:
            errors.append(r.sent(due_root, now))
            sent.append(now)
        r.done(root, now + 0.01)
        now += 0.05
    return sent, [e for e in errors if e]


def test_the_first_asks_go_out_at_once_then_back_off_doubling_up_to_the_bound():
    r = ResyncRequests(free=3, backoff=0.25, backoff_max=8.0, give_up=10)
    sent, errors = _loop(r, b"d", 0.0)
    gaps = [round(b - a, 2) for a, b in zip(sent, sent[1:], strict=False)]
    assert gaps[:2] == [0.05, 0.05]                        # asks 1-3: as fast as it fails
    # then 0.25, 0.5, 1, 2, 4, 8, 8, ... (to the loop's 50 ms tick)
    assert [round(g * 4) / 4 for g in gaps[2:8]] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], gaps
    assert max(gaps) <= 8.05
    assert len(errors) == 1 and "'d' still diverges after 10 resyncs in a row" in errors[0]


def test_a_resync_on_its_way_covers_its_subtree_and_the_one_below():
    r = ResyncRequests()
    assert r.ask(b"a", 1, "x", 0.0)
    r.sent(b"a", 0.0)
    assert not r.ask(b"a", 2, "x", 0.1) and not r.ask(b"a/b", 3, "x", 0.1)
    assert r.ask(b"ab", 4, "x", 0.1)                       # a sibling, not below
    assert r.done(b"a", 0.2) and not r.done(b"a", 0.3)
    assert r.ask(b"a", 5, "x", 0.3)                        # after the resync: again at once


def test_a_given_up_subtree_that_converges_clears_its_error_and_starts_afresh():
    r = ResyncRequests(free=1, backoff=0.1, backoff_max=0.1, give_up=3, quiet=2.0, forgive=60)
    now = 0.0
    said = []
    for _ in range(3):
        while not r.ask(b"d", 1, "x", now):
            now += 0.05
            assert r.due(now)[1] == []
        said.append(r.sent(b"d", now))
        r.done(b"d", now)
    assert said[:2] == ["", ""] and "still diverges" in said[2] and b"d" in r.errors
    assert r.due(now + 1.0) == ([], [])                    # done, not quiet long enough
    assert r.due(now + 2.5) == ([], [b"d"]) and not r.errors
    assert r.ask(b"d", 1, "x", now + 2.6)                  # afresh: at once


def test_subtrees_not_asked_for_long_are_forgotten():
    r = ResyncRequests(forgive=10.0)
    for i in range(100):
        r.sent(b"d%d" % i, 0.0)
        r.done(b"d%d" % i, 0.0)
    assert not r.check_due(5.0) and r.check_due(10.5)
    r.due(10.5)
    assert len(r) == 0
