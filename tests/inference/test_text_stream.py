"""Streaming text with stop strings (inference/text_stream.py): what is released, piece by piece, adds up to
the completion's text cut at its first stop string, and nothing released is ever taken back.

Reference: decode the visible tokens after each token; at the first token whose text (ending in a
complete character) contains a stop string, the answer is that text up to the earliest one. Tokens are
byte strings decoded as UTF-8 (errors="replace"), so a character split across tokens shows U+FFFD until
its last byte comes, as a byte-level BPE tokenizer does."""

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.text_stream import INCOMPLETE, TextStream

PIECES = [b"a", b"b", b"\n", b"ab", b"b\n", b"\n\n", b"\xc3", b"\xa9", b"c\xc3", b" ", b"ba"]  # \xc3\xa9 is e-acute
HIDDEN = {99}


def decode(ids):
    return b"".join(PIECES[i] for i in ids if i != 99).decode("utf-8", errors="replace")


def reference(tokens, stop):
    visible = []
    for t in tokens:
        if t not in HIDDEN:
            visible.append(t)
        text = decode(visible)
        if text.endswith(INCOMPLETE):
            continue
        found = [i for i in (text.find(s) for s in stop) if i >= 0]
        if found:
            return text[:min(found)], True
    # at the end, the last text that ended in a complete character
    last = ""
    for k in range(len(visible) + 1):
        text = decode(visible[:k])
        if not text.endswith(INCOMPLETE):
            last = text
    return last, False


def run(tokens, stop):
    stream, pieces = TextStream(decode, HIDDEN, stop), []
    for i, t in enumerate(tokens):
        piece, records = stream.add(t, record=i)
        pieces.append(piece)
        if stream.stopped:
            break
    if not stream.stopped:
        pieces.append(stream.finish()[0])
    return pieces, stream


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(list(range(len(PIECES))) + [99]), max_size=14),
       stop=st.lists(st.sampled_from(["\n\n", "ab", "é", "b\nb", "aaa", "a b"]), max_size=3, unique=True))
def test_released_pieces_add_up_to_the_text_cut_at_the_first_stop_string(tokens, stop):
    pieces, stream = run(tokens, stop)
    want, stopped = reference(tokens, stop)
    assert "".join(pieces) == want == stream.text
    assert stream.stopped == stopped
    for k in range(1, len(pieces) + 1):  # no stop string is ever released, not even for a moment
        assert not any(s in "".join(pieces[:k]) for s in stop)


def test_a_stop_string_across_tokens_is_held_back_then_dropped():
    stream = TextStream(decode, HIDDEN, ["\n\n"])
    assert stream.add(4)[0] == "b"  # "b\n": the "\n" may start "\n\n", so it waits
    assert stream.add(2)[0] == "" and stream.stopped  # "\n" completes "\n\n": nothing more, and the stop is dropped
    assert stream.text == "b"


def test_held_text_is_released_when_the_next_token_goes_another_way():
    stream = TextStream(decode, HIDDEN, ["\n\n"])
    assert stream.add(4)[0] == "b"
    assert stream.add(0)[0] == "\na"


def test_a_character_split_across_tokens_waits_for_its_last_byte_and_records_go_with_their_text():
    stream = TextStream(decode, HIDDEN)
    assert stream.add(8, "c+lead") == ("", [])  # "c" and the first byte of e-acute: incomplete
    assert stream.add(7, "trail") == ("cé", ["c+lead", "trail"])
    assert stream.add(99, "eos") == ("", [])  # hidden: no text, its record waits for the end
    assert stream.finish() == ("", ["eos"])
    assert stream.num_tokens == 3 and stream.offsets == [0, 0, 2]
