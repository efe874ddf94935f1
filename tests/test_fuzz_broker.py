"""Hostile launchers against a real broker while a good pair streams (issue 13, item 7).

A property test: hypothesis draws connections (some become guests first, some never read
their replies) and the messages they send — any op, arguments at the edges or random, tails
of random bytes or mutated INITIALIZE layouts, descriptors of every kind (lgnet/fuzz.py).
After each example the broker must be running, answer within FREEZE_SECONDS, and hold no
descriptor more than before; at the end, every frame the good pair's sender saw taken must
be one its receiver verified. `python -m lgnet.fuzz --minutes N` is the same, for longer."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lgnet import abi, fuzz, wire

pytestmark = pytest.mark.timeout(300)
STREAM_SECONDS = 25.0                # the good pair streams while the examples run

args = st.one_of(st.sampled_from(fuzz.EDGES), st.integers(0, abi.U32_MASK))
tails = st.one_of(st.binary(max_size=300), st.randoms(use_true_random=False).map(
    fuzz.mutate_layout), st.just(fuzz.good_layout()))
messages = st.tuples(st.sampled_from(fuzz.OPS), args, args, args, args, tails,
                     st.sampled_from(fuzz.FD_KINDS))
hypercalls = st.tuples(st.just(wire.OP_HCALL), st.sampled_from(fuzz.HYPERCALLS), args, args,
                       args, st.just(b""), st.sampled_from(fuzz.FD_KINDS))
connections = st.fixed_dictionaries({
    "guest": st.booleans(),
    "reads": st.booleans(),
    "messages": st.lists(st.one_of(messages, hypercalls), max_size=30),
})


@pytest.fixture(scope="module")
def lab():
    lab = fuzz.Lab(stream_seconds=STREAM_SECONDS)
    yield lab
    lab.close()


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(connections, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_no_launcher_message_brings_the_broker_down(lab, specs, rng):
    hostile = []
    for spec in specs:
        try:
            launcher = fuzz.HostileLauncher(lab.path, rng, lab.pair_ids)
        except OSError as exc:
            pytest.fail("cannot connect (%s); the broker's last words: %s"
                        % (exc, lab.last_words()))
        launcher.reads = spec["reads"]
        if spec["guest"]:
            launcher.become_guest()
        hostile.append((launcher, list(spec["messages"])))
    while any(queue for _, queue in hostile):       # the connections take turns
        for launcher, queue in hostile:
            if queue:
                launcher.send(*queue.pop(0))
    for launcher, _ in hostile:
        launcher.close()
    counts = fuzz.Counts()
    fuzz.check(lab, counts)
    assert counts.crashes == 0, counts.notes
    assert counts.freezes == 0
    assert counts.fd_leak == 0


def test_the_good_pair_lost_no_frame_meanwhile(lab):
    counts = fuzz.Counts()
    fuzz.check(lab, counts)
    assert counts.crashes == 0, counts.notes
    lab.finish(counts)
    assert counts.frames_sent > 1000, counts.notes
    assert counts.frames_lost == 0 and counts.corrupt == 0, counts.as_dict()
    assert counts.frames_verified == counts.frames_sent
