"""Synthetic fundus photographs with ground truth, written as DICOM studies.

`random_case`/`draw_fundus` draw a picture and its GroundTruth; `write_op_image` writes one DICOM
instance; `write_study` writes both eyes of a synthetic patient plus ground_truth.json.
"""

from fundusrt.synth.dicom_writer import TRANSFER_SYNTAXES, VARIANTS, write_op_image
from fundusrt.synth.fundus import CaseSpec, draw_fundus, random_case
from fundusrt.synth.grading import GroundTruth
from fundusrt.synth.study import GROUND_TRUTH_NAME, StudyTruth, write_study

__all__ = [
    "GROUND_TRUTH_NAME",
    "TRANSFER_SYNTAXES",
    "VARIANTS",
    "CaseSpec",
    "GroundTruth",
    "StudyTruth",
    "draw_fundus",
    "random_case",
    "write_op_image",
    "write_study",
]
