"""Progressive JPEG at 1/8 scale: keep only the scans that such a decode actually reads.

At 1/8 DCT scaling libjpeg(-turbo) turns each 8x8 block of a full-resolution component into one
pixel with a 1x1 inverse DCT, which reads the DC coefficient only. A progressive JPEG stores the
DC coefficients in their own short scans (a few % of the file) and the AC coefficients in the
rest, yet a decoder entropy-decodes every scan whatever the scale: measured 60-190 ms per
10-15 MP photo of the benchmark photo set (docs/benchmarks.md). Dropping the AC scans of those
components makes the same 1/8 decode 2-7x cheaper and leaves every output pixel unchanged: tests compare it bit for bit with
the decode of the whole file.

Two details keep it exact:
- Chroma subsampled 2x (4:2:0) is scaled up by the IDCT, not by upsampling: libjpeg-turbo
  gives such a component a 2x2 IDCT at 1/8 scale (jdmaster.c's per-component DCT scaling),
  which reads AC coefficients. Its scans are all kept; the formula below is libjpeg-turbo's.
- With AC scans missing, libjpeg's progressive "block smoothing" would estimate the absent
  coefficients and, since libjpeg-turbo 2.1, adjust the DC of blocks that received no AC at
  all. Smoothing is skipped when a quantisation table has a zero among its first AC entries,
  so the AC entries of the tables used only by the pruned components are zeroed: their AC
  coefficients are absent (zero) anyway and the 1x1 IDCT multiplies only the DC by its entry.
Anything unusual (not progressive, arithmetic coding, a table shared between pruned and kept
components, a missing EOI, a segment that runs past the end) returns None: decode the whole file.
"""
from __future__ import annotations

import re
import struct
from typing import Dict, Iterator, List, Optional, Set, Tuple

# The next marker after entropy-coded data: 0xFF not followed by a stuffed 0x00, a restart
# marker RST0-7 (those belong to the scan), or another 0xFF fill byte.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF_OTHER = {0xC0, 0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
SOS, _DQT, _EOI, _DNL = 0xDA, 0xDB, 0xD9, 0xDC


def _needs_ac(sampling: Dict[int, Tuple[int, int]]) -> Dict[int, bool]:
    """Component id -> whether its 1/8-scale IDCT is larger than 1x1 (libjpeg-turbo's rule)."""
    mh = max(h for h, _ in sampling.values())
    mv = max(v for _, v in sampling.values())
    out = {}
    for cid, (h, v) in sampling.items():
        ssize = 1  # min DCT scaled size at 1/8; doubled while the sampling ratio allows it
        while ssize < 8 and mh % (h * ssize * 2) == 0 and mv % (v * ssize * 2) == 0:
            ssize *= 2
        out[cid] = ssize > 1
    return out


def _zero_ac(segment: bytes, tables: Set[int]) -> Optional[bytes]:
    """A DQT segment with the 63 AC entries of `tables` set to zero (None if malformed)."""
    seg = bytearray(segment)
    p = 4
    while p < len(seg):
        precision, tid = seg[p] >> 4, seg[p] & 15
        width = 2 if precision else 1
        if p + 1 + 64 * width > len(seg):
            return None
        if tid in tables:
            seg[p + 1 + width:p + 1 + 64 * width] = bytes(63 * width)
        p += 1 + 64 * width
    return bytes(seg)


def segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(marker, start, end) of each segment between SOI and EOI. A scan (SOS) segment ends where
    its entropy-coded data does. Raises ValueError for a stream that is not a JPEG, a segment
    running past the end, a DNL marker, or a missing EOI (truncated: the caller leaves it to the
    decoder)."""
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    pos = 2
    while True:
        if pos + 2 > n or data[pos] != 0xFF:
            raise ValueError("no marker where one must be")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            return
        if marker == _DNL:  # the image height comes after the scan: no rewriter here handles it
            raise ValueError("DNL marker")
        if pos + 4 > n:
            raise ValueError("truncated")
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if end > n:
            raise ValueError("segment past the end")
        if marker == SOS:
            nxt = _NEXT_MARKER.search(data, end)
            if nxt is None:
                raise ValueError("no EOI after the last scan")
            end = nxt.start()
        yield marker, pos, end
        pos = end


def eighth_scale_scans(data: bytes) -> Optional[bytes]:
    """`data` (a progressive Huffman JPEG) reduced to what a 1/8-scale decode reads, or None."""
    try:
        return _prune(data)
    except (IndexError, ValueError, struct.error):  # malformed: a full decode decides
        return None


def _prune(data: bytes) -> Optional[bytes]:
    parts: List[bytes] = [data[:2]]
    dqt_at: List[int] = []
    sampling: Dict[int, Tuple[int, int]] = {}
    table_of: Dict[int, int] = {}
    needs_ac: Optional[Dict[int, bool]] = None
    for marker, pos, end in segments(data):
        if marker in _SOF_OTHER:
            return None
        if marker == _SOF_PROGRESSIVE_HUFFMAN:
            count = data[pos + 9]
            if end < pos + 10 + 3 * count or count == 0:
                return None
            for i in range(count):
                cid, hv, tq = data[pos + 10 + 3 * i:pos + 13 + 3 * i]
                if not (hv >> 4 and hv & 15):
                    return None
                sampling[cid], table_of[cid] = (hv >> 4, hv & 15), tq
            needs_ac = _needs_ac(sampling)
        elif marker == SOS:
            if needs_ac is None:
                return None
            count = data[pos + 4]
            cids = list(data[pos + 5:pos + 5 + 2 * count:2])
            if any(c not in needs_ac for c in cids):
                return None
            if data[pos + 5 + 2 * count] == 0 or all(needs_ac[c] for c in cids):  # Ss == 0: DC
                parts.append(data[pos:end])
            continue
        if marker == _DQT:
            dqt_at.append(len(parts))
        parts.append(data[pos:end])
    if needs_ac is None:
        return None
    pruned = {table_of[c] for c, ac in needs_ac.items() if not ac}
    kept = {table_of[c] for c, ac in needs_ac.items() if ac}
    if pruned & kept:  # zeroing a shared table would change the kept components
        return None
    for i in dqt_at:
        seg = _zero_ac(parts[i], pruned)
        if seg is None:
            return None
        parts[i] = seg
    parts.append(b"\xff\xd9")
    return b"".join(parts)
