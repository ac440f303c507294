"""Header-only parsing of JPEG, JPEG-LS and JPEG 2000 codestreams.

Read before any decoder runs, so that a frame whose codestream claims a size other than the
DICOM header's (a decompression bomb, or a corrupt file) is refused without allocating it, and
so that the colour space of a JPEG stream is known before choosing how to decode it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC); F7 is JPEG-LS SOF55.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
# Markers that stand alone (no length field): TEM, RST0-7, SOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# JP2 wrappers put boxes before the codestream; DICOM allows either form.
_J2K_SEARCH_LIMIT = 1 << 16


class CodestreamError(ValueError):
    """The codestream header is missing, truncated or malformed."""


@dataclass(frozen=True)
class CodestreamInfo:
    """Frame geometry and colour hints from a codestream header.

    Attributes:
        jfif: a JFIF APP0 segment is present (the samples are YCbCr by definition).
        adobe_transform: the APP14 "Adobe" transform flag (0: RGB/no transform, 1: YCbCr), None when absent.
        component_ids: the SOF component identifiers ("R", "G", "B" mean untransformed RGB).
    """

    width: int
    height: int
    components: int
    precision: int
    component_ids: tuple[int, ...] = ()
    jfif: bool = False
    adobe_transform: int | None = None

    @property
    def rgb_component_ids(self) -> bool:
        return self.component_ids in ((82, 71, 66), (114, 103, 98))


def jpeg_info(data: bytes) -> CodestreamInfo:
    """Parse the segments of a JPEG or JPEG-LS stream up to its SOF marker.

    Raises:
        CodestreamError: no SOI, no SOF before the first scan, or a truncated segment.
    """
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("JPEG frame does not start with an SOI marker (FFD8)")
    jfif = False
    adobe_transform: int | None = None
    offset = 2
    end = len(data)
    while offset < end:
        if data[offset] != 0xFF:
            raise CodestreamError(f"JPEG header is corrupt: expected a marker at byte {offset}")
        while offset < end and data[offset] == 0xFF:  # fill bytes may pad before a marker
            offset += 1
        if offset >= end:
            break
        marker = data[offset]
        offset += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xDA, 0xD9):
            raise CodestreamError("JPEG frame has no SOF segment before its scan data")
        if offset + 2 > end:
            break
        (length,) = struct.unpack(">H", data[offset:offset + 2])
        if length < 2 or offset + length > end:
            break
        segment = data[offset + 2:offset + length]
        if marker in _SOF_MARKERS:
            if len(segment) < 6:
                break
            precision, height, width, components = struct.unpack(">BHHB", segment[:6])
            ids = tuple(segment[6 + 3 * i] for i in range(components) if 6 + 3 * i < len(segment))
            return CodestreamInfo(width=width, height=height, components=components, precision=precision,
                                  component_ids=ids, jfif=jfif, adobe_transform=adobe_transform)
        if marker == 0xE0 and segment.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        offset += length
    raise CodestreamError("JPEG header is truncated before its SOF segment")


def j2k_info(data: bytes) -> CodestreamInfo:
    """Parse the SIZ segment of a JPEG 2000 codestream (raw, or inside a JP2 wrapper).

    Raises:
        CodestreamError: no SOC+SIZ markers near the start, or a truncated SIZ segment.
    """
    start = data.find(_J2K_SOC_SIZ, 0, _J2K_SEARCH_LIMIT)
    if start < 0:
        raise CodestreamError("JPEG 2000 frame has no SOC/SIZ markers (FF4F FF51) at its start")
    siz = data[start + 4:]
    # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then Ssiz of component 0.
    if len(siz) < 39:
        raise CodestreamError("JPEG 2000 SIZ segment is truncated")
    _, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, csiz = struct.unpack(">HHIIIIIIIIH", siz[:38])
    if xsiz <= xosiz or ysiz <= yosiz or csiz == 0:
        raise CodestreamError(f"JPEG 2000 SIZ segment is invalid (size {xsiz}-{xosiz} x {ysiz}-{yosiz}, "
                              f"{csiz} components)")
    precision = (siz[38] & 0x7F) + 1
    return CodestreamInfo(width=xsiz - xosiz, height=ysiz - yosiz, components=csiz, precision=precision)
