"""A greyscale JPEG turned into a colour (YCbCr) JPEG without decoding it: lossless and ~100x cheaper.

Shards store RGB JPEGs. A one-component JPEG would otherwise be decoded and re-encoded, which
costs a generation of JPEG loss and, in pass-through runs, most of the CPU time (the 18 grey
JPEGs of shared/photos took 0.24 s per 1,000 files in a profile). A colour JPEG whose chroma
planes are flat at the neutral level decodes to R = G = B = the grey level, exactly: libjpeg's
YCbCr -> RGB adds nothing for Cb = Cr = 128, and an all-zero chroma block is exactly 128 after the
inverse DCT. Sequential JPEG allows one scan per component, so the file is rebuilt as:
- the original segments, the frame header widened to three components (all sampled 1x1, the
  chroma on the luma's quantisation table: their coefficients are zero anyway), an Adobe APP14
  segment dropped (with three components its transform flag could declare RGB);
- the original luma scan, byte for byte;
- restart markers switched off, one Huffman table pair whose only codes are "DC difference 0"
  and "end of block" (one bit each), and a scan per chroma plane of two zero bits per block.
Only 8-bit sequential Huffman JPEGs are handled; anything else returns None (decode and encode).
"""
from __future__ import annotations

import struct
from typing import List, Optional

from seer_pipeline.codecs.jpeg_scans import SOS, segments

_SOF_SEQUENTIAL = {0xC0, 0xC1}
_SOF_OTHER = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_APP14 = 0xEE
# DHT: DC table 1 and AC table 1, each a single one-bit code "0" (DC category 0 / AC end of block)
_ZERO_TABLES = (b"\xff\xc4" + struct.pack(">H", 2 + 2 * 17 + 2)
                + b"\x01" + b"\x01" + bytes(15) + b"\x00"
                + b"\x11" + b"\x01" + bytes(15) + b"\x00")
_NO_RESTART = b"\xff\xdd\x00\x04\x00\x00"


def _flat_scan(component: int, blocks: int) -> bytes:
    """SOS + entropy data for `blocks` all-zero blocks of `component`: two zero bits each."""
    header = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, component, 0x11, 0, 63, 0)
    nbits = 2 * blocks
    body = bytearray(nbits // 8)
    if nbits % 8:  # pad the last byte with one-bits, as the standard asks
        body.append((1 << (8 - nbits % 8)) - 1)
    return header + bytes(body)


def grey_to_ycbcr(data: bytes) -> Optional[bytes]:
    """A lossless three-component version of a one-component sequential JPEG, or None."""
    try:
        return _convert(data)
    except (IndexError, ValueError, struct.error):  # malformed or truncated: decode and encode
        return None


def _convert(data: bytes) -> Optional[bytes]:
    parts: List[bytes] = [data[:2]]
    blocks, ids, scanned = 0, (0, 0), False
    for marker, pos, end in segments(data):
        if scanned or marker in _SOF_OTHER:
            return None  # only EOI may follow the one scan of a sequential grey JPEG
        if marker in _SOF_SEQUENTIAL:
            precision, height, width, count = struct.unpack_from(">BHHB", data, pos + 4)
            if precision != 8 or count != 1 or height == 0 or end != pos + 2 + 8 + 3:
                return None
            cid, _, table = data[pos + 10:pos + 13]
            ids = tuple(c for c in range(1, 256) if c != cid)[:2]
            blocks = -(-width // 8) * -(-height // 8)
            comps = bytes([cid, 0x11, table, ids[0], 0x11, table, ids[1], 0x11, table])
            parts.append(data[pos:pos + 2] + struct.pack(">HBHHB", 8 + 9, 8, height, width, 3) + comps)
        elif marker == SOS:
            if not blocks:
                return None
            scanned = True
            parts.append(data[pos:end])
        elif marker != _APP14:
            parts.append(data[pos:end])
    if not scanned:
        return None
    parts += [_NO_RESTART, _ZERO_TABLES, _flat_scan(ids[0], blocks), _flat_scan(ids[1], blocks), b"\xff\xd9"]
    return b"".join(parts)
