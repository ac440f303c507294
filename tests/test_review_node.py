"""`fundusrt serve --ui`: the review page over the live node, in headless Chromium.

The node runs the tiny exported package (shared with the other node tests, hence slow) and sends its
results to a pynetdicom Storage SCP standing in for the PACS. A two-eye study arrives by dcmtk storescu
while the grader's worklist is open; it must appear and finish without a reload; the grader opens it,
sees the images drawn, overrides one eye, and the sign-off SR reaches the PACS beside the AI's SR.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pydicom
import pytest

from fundusrt.synth import write_study
from tests.test_dicom_results import dciodvfy_errors
from tests.test_node import Receiver, dcmtk_storescu, storescu
from tests.test_node_cli import Serve
from tests.test_review import (
    COMPREHENSIVE_SR,
    ROI_GREEN,
    chrome,
    colour_pixels,
    eye_evaluations,
    images_loaded,
    predecessor_uids,
    refused_without_csrf,
    rows,
    sign_in,
    wait_for,
)

pytest.importorskip("starlette", reason="the review page needs fundusrt[ui]")
UI_LINE = re.compile(r"^fundusrt serve: review page at (?P<url>http://\S+/) \(.*the token (?P<token>\S+)\)$", re.M)


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


@pytest.mark.slow
def test_serve_ui_shows_a_study_arriving_and_sends_the_sign_off(package: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    dcmtk_storescu()  # skip early when dcmtk is missing
    driver = chrome()  # and when chromium is
    study = write_study(tmp_path / "study", seed=4, size=(256, 256), variants=("op",),
                        transfer_syntaxes=("jpeg-baseline",))
    pacs = Receiver()
    spool = tmp_path / "spool"
    serve = Serve(tmp_path / "node", "--package", str(package), "--spool", str(spool), "--port", "0",
                  "--send-to", f"PACS@127.0.0.1:{pacs.destination.port}", "--quiet-seconds", "1",
                  "--max-new-tokens", "6", "--threads", "1", "--ui", "--ui-port", "0")
    try:
        dicom_port = int(serve.wait_ready()["port"])
        ui = wait_for(None, lambda _: UI_LINE.search(serve.stdout), message="no review page line")
        sign_in(driver, ui["url"], "Jane Doe", ui["token"])
        wait_for(driver, lambda d: d.find_element(By.ID, "empty").is_displayed(), message="worklist not empty")

        sent = storescu(dicom_port, study.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # No reload: the open worklist polls, shows the study, then its result.
        row = f"tr[data-study='{study.study_instance_uid}']"
        wait_for(driver, lambda d: rows(d), message="the study did not appear")
        wait_for(driver, lambda d: rows(d)[0]["status"] == "done", timeout=90,
                 message="the study did not finish on the page")
        (shown,) = rows(driver)
        assert shown["study"] == study.study_instance_uid and study.patient_name in shown["text"]

        wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} a").click() or True)  # retried on redraw
        wait_for(driver, lambda d: d.find_elements(By.ID, "study") and images_loaded(d), message="images not drawn")
        images = driver.find_elements(By.CSS_SELECTOR, "img.fundus")
        assert len(images) == len(study.instances)
        assert all(colour_pixels(image.screenshot_as_png, ROI_GREEN) > 50 for image in images)
        ai_decision = Select(driver.find_element(By.ID, "decision-L")).first_selected_option.get_attribute("value")
        override = "ungradable" if ai_decision != "ungradable" else "refer"
        Select(driver.find_element(By.ID, "decision-L")).select_by_value(override)
        driver.find_element(By.ID, "reason-L").send_keys("media opacity, retake")
        driver.find_element(By.ID, "sign-off").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "signed"), message="no confirmation of the sign-off")
        assert refused_without_csrf(driver, f"/study/{study.study_instance_uid}/signoff") == 403

        def signoff_at_pacs() -> list:
            return [ds for ds in pacs.of_class(COMPREHENSIVE_SR) if ds.get("VerificationFlag") == "VERIFIED"]

        wait_for(driver, lambda _: signoff_at_pacs(), timeout=30, message="the sign-off SR did not reach the PACS")
        driver.get(ui["url"])
        wait_for(driver, lambda d: rows(d) and "overridden by Jane Doe" in rows(d)[0]["text"],
                 message="the worklist does not show the sign-off")
        assert serve.stop(signal.SIGTERM) == 0, serve.stderr
    finally:
        driver.quit()
        serve.kill()
        pacs.server.shutdown()

    (signoff,) = signoff_at_pacs()
    (ai,) = [ds for ds in pacs.of_class(COMPREHENSIVE_SR) if ds.get("VerificationFlag") != "VERIFIED"]
    assert predecessor_uids(signoff) == {ai.SOPInstanceUID}
    assert signoff.StudyInstanceUID == study.study_instance_uid and signoff.PatientID == study.patient_id
    evaluations = eye_evaluations(signoff)
    assert evaluations["L"]["signoff"] == "overridden" and evaluations["L"]["comment"] == "media opacity, retake"
    assert evaluations["R"]["signoff"] == "confirmed"
    (path,) = spool.glob("results/*/signoffs/SO_*.dcm")
    assert pydicom.dcmread(path).SOPInstanceUID == signoff.SOPInstanceUID
    assert dciodvfy_errors(path) == []
    events = [json.loads(line) for line in (spool / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("login", "signed_off")] == ["login", "signed_off"]
    logs = serve.stdout + serve.stderr + (spool / "audit.log").read_text()
    assert study.patient_name not in logs and study.patient_id not in logs
