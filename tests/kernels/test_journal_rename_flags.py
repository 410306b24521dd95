"""RENAME's flags (RenameFlag.EXCHANGE, made by the capture mount's
renameat2(RENAME_EXCHANGE)): both frame codecs carry them, byte for byte
alike, and refuse unknown ones on either side."""
import pytest

from smirror.errors import FrameError
from smirror.kernels import _journal, _journal_py
from smirror.ops import HEADER_SIZE, Op, OpKind, RenameFlag
from support.journal_ops import IMPLS, PAIRS, reseal


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_an_exchange_round_trips_between_both_codecs(enc, dec):
    ops = [Op.rename(1, b"a", b"b", RenameFlag.EXCHANGE), Op.rename(2, b"c", b"d/e")]
    out = dec.decode_frame(enc.encode_frame(ops, False))[0]
    assert out == ops
    assert out[0].kind == OpKind.RENAME and out[0].mask == RenameFlag.EXCHANGE
    assert out[1].mask == 0
    assert repr(out[0]).endswith("exchange)") and "exchange" not in repr(out[1])


def test_both_codecs_write_the_same_bytes_for_an_exchange():
    ops = [Op.rename(7, b"x/y", b"z", RenameFlag.EXCHANGE)]
    assert _journal.encode_frame(ops, False) == _journal_py.encode_frame(ops, False)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_unknown_rename_flag_is_refused_when_encoding(impl):
    with pytest.raises(ValueError, match="mask"):
        impl.encode_frame([Op.rename(1, b"a", b"b")._replace(mask=2)], False)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_unknown_rename_flag_is_refused_when_decoding_naming_the_op(impl):
    frame = bytearray(_journal_py.encode_frame([Op.rename(1, b"a", b"b", RenameFlag.EXCHANGE)],
                                               False))
    frame[HEADER_SIZE + 1] = 2          # the record's mask byte
    with pytest.raises(FrameError, match="bad rename flags 0x02"):
        impl.decode_frame(reseal(bytes(frame)))
