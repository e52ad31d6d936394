"""Damage a checkpoint the way a disk or a copy can (imported by tests; no test_ prefix)."""

import struct
import zipfile


def flip_bit_in_tensor_bytes(path, record="data/0", bit=3) -> None:
    """Flip one bit in the raw bytes of a tensor stored in a torch checkpoint (a zip whose
    ``<archive>/data/N`` records are stored uncompressed); torch.load checks no CRC."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/" + record))
    assert info.file_size > 0 and info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    # The local header's name and extra lengths (torch pads the extra field for alignment, so
    # it can differ from the central directory's).
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    raw[start + info.file_size // 2] ^= 1 << bit
    path.write_bytes(bytes(raw))
