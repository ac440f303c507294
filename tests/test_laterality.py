"""The picture-read laterality on the synthetic generator's macula-centred fields, whose eye is known exactly.

Real photographs are in test_real_photos.py; these cover many more disc positions, sizes and lesion
loads than the real set, so a change to the detector that trades them away shows here.
"""

from __future__ import annotations

from fundusrt.dicom.laterality import CONFIDENT, image_laterality
from fundusrt.synth import draw_fundus, random_case


def test_every_synthetic_eye_is_read_confidently_right() -> None:
    wrong = []
    for seed in range(20):
        case = random_case(seed, 512, 512)
        found = image_laterality(draw_fundus(case)[0])
        if found.value != case.laterality or found.confidence < CONFIDENT:
            wrong.append((seed, case.laterality, found))
    assert not wrong, wrong
