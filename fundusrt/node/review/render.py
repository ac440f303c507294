"""Images for the page: a frame decoded by the fundusrt reader, the fundus field of view and the lesion boxes
drawn on it (as on the Secondary Capture and the PDF), encoded as JPEG, kept in a small LRU cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from fundusrt.dicom.capture import draw_boxes, line_width, source_frame
from fundusrt.dicom.findings import LesionBox
from fundusrt.kernels.roi import find_fundus_roi

ROI_COLOUR = (0, 200, 0)
JPEG_QUALITY = 88


def render_image(path: Path, sop_instance_uid: str, frame_index: int, lesions: list[LesionBox],
                 max_side: int | None) -> bytes:
    """The frame as JPEG with the field of view (green) and `lesions` outlined, shrunk to `max_side` if given.

    Raises:
        ResultWriteError: the frame cannot be read from `path`.
    """
    pixels = source_frame(path, sop_instance_uid, frame_index).pixels
    picture = Image.fromarray(draw_boxes(pixels, lesions) if lesions else pixels)
    roi = find_fundus_roi(pixels)
    if roi is not None:
        ImageDraw.Draw(picture).rectangle((roi[0], roi[1], roi[2] - 1, roi[3] - 1), outline=ROI_COLOUR,
                                          width=line_width(*pixels.shape[:2]))
    if max_side:
        picture.thumbnail((max_side, max_side))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: thin coloured lines stay coloured
    return out.getvalue()


class ImageCache:
    """Rendered images by key (the source and what was drawn on it), least recently used dropped first."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get_or_render(self, key: Any, render: Any) -> bytes:
        """The cached bytes for `key`, or `render()`'s, stored."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = render()  # outside the lock: rendering takes tens of milliseconds
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._size += len(data)
            while self._size > self.max_bytes and len(self._items) > 1:
                self._size -= len(self._items.popitem(last=False)[1])
        return data
