"""The review page over a results folder (`fundusrt review DIR`), against real peers: the uvicorn server over
HTTP(S), headless Chromium driven by selenium (Debian's chromium + chromium-driver), dciodvfy for the
sign-off SR, and pydicom reading it back.

The results are what `fundusrt run --dicom-out` writes (`write_results`) for reports a perfect model would
give (the synth ground truth, so there are lesion boxes to draw); no model is needed. The browser test
saves its screenshots to FUNDUSRT_REVIEW_SCREENSHOTS when set (the README's come from
`FUNDUSRT_REVIEW_SCREENSHOTS=docs pytest tests/test_review.py tests/test_review_node.py`).
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from fundusrt.dicom.capture import BOX_COLOURS
from fundusrt.dicom.signoff import build_signoff_sr, person_name
from fundusrt.dicom.sr import DECISION_CODES, ResultWriteError
from fundusrt.dicom.results import write_results
from fundusrt.synth import write_study
from tests.test_dicom_results import dciodvfy_errors, report_from_truth

pytest.importorskip("starlette", reason="the review page needs fundusrt[ui]")
pytest.importorskip("uvicorn", reason="the review page needs fundusrt[ui]")

from fundusrt.node.review.auth import UsersFileError, check_password, hash_password, load_users  # noqa: E402

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ROI_GREEN = (0, 200, 0)
LINE = re.compile(r"review page at (?P<url>https?://\S+/) \((?P<how>[^)]*)\)")


# ---------------------------------------------------------------- helpers shared with test_review_node

def chrome() -> Any:
    """Headless Chromium through selenium and Debian's chromedriver (skips when one of them is absent)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000",
                "--force-device-scale-factor=1", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def wait_for(driver: Any, condition: Any, timeout: float = 30, message: str = "") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the worklist redraws its rows at every poll: an element found a moment ago may be gone
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
                         ).until(condition, message)


def sign_in(driver: Any, url: str, name: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda d: d.current_url.endswith("/login"), message="not sent to the sign-in page")
    driver.find_element(By.ID, "login").send_keys(name)
    driver.find_element(By.ID, "secret").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "worklist"), message="sign-in did not open the worklist")


def rows(driver: Any) -> list[dict[str, str]]:
    """The worklist's rows as {"study", "status", "text"}, read in one go (the page redraws them at every poll)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#studies tr.study')].map(r => "
        "({study: r.dataset.study, status: r.dataset.status, text: r.innerText}));")


def colour_pixels(png: bytes, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels of a screenshot are within `tolerance` of `colour` on every channel."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).sum())


def images_loaded(driver: Any) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('img.fundus')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def save_screenshot(driver: Any, name: str) -> bytes:
    """A screenshot of the page (kept under FUNDUSRT_REVIEW_SCREENSHOTS/<name> when that is set)."""
    png = driver.get_screenshot_as_png()
    folder = os.environ.get("FUNDUSRT_REVIEW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)
    return png


def refused_without_csrf(driver: Any, path: str) -> int:
    """The status of a POST from the signed-in page (its cookie goes along) without the CSRF token."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({'decision.R': 'refer'}),"
        " credentials: 'same-origin'}).then(r => done(r.status), e => done(String(e)));", path)


def predecessor_uids(ds: Any) -> set[str]:
    return {ref.ReferencedSOPInstanceUID for s in ds.PredecessorDocumentsSequence
            for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def evidence_uids(ds: Any) -> set[str]:
    return {ref.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def eye_evaluations(ds: Any) -> dict[str, dict[str, str]]:
    """Per eye (R/L, from the finding site laterality) the coded evaluations of a sign-off SR: concept -> value."""
    eyes: dict[str, dict[str, str]] = {}
    for container in ds.ContentSequence:
        for group in container.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            laterality = next((mod.ConceptCodeSequence[0].CodeValue for item in items
                               if item.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"
                               for mod in item.get("ContentSequence", [])), None)
            if laterality is None:
                continue
            eye = {"24028007": "R", "7771000": "L"}[laterality]
            eyes[eye] = {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
                         for item in items if item.ValueType == "CODE" and "ConceptCodeSequence" in item}
            eyes[eye].update({"comment": item.TextValue for item in items if item.ValueType == "TEXT"
                              and item.ConceptNameCodeSequence[0].CodeValue == "121106"})
    return eyes


# ---------------------------------------------------------------- fixtures

@dataclass
class Results:
    folder: Path
    studies: list[Any]
    reports: dict[str, dict[str, Any]]  # by StudyInstanceUID


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Two studies' results as `fundusrt run --dicom-out` writes them: seed 7 refers the left eye only, seed 5
    refers neither; both have lesion boxes."""
    root = tmp_path_factory.mktemp("review")
    studies, reports = [], {}
    for seed in (5, 7):
        study = write_study(root / f"study{seed}", seed=seed, size=(320, 256), variants=("op",),
                            transfer_syntaxes=("jpeg-baseline",))
        report = report_from_truth(study)
        write_results(report, root / "results" / f"run{seed}")
        studies.append(study)
        reports[study.study_instance_uid] = report
    return Results(root / "results", studies, reports)


class ReviewProcess:
    """`fundusrt review DIR` as a process, its output in files."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.out, self.err = folder / "review.out", folder / "review.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fundusrt.cli", "review", *args], stdout=out,
                                         stderr=err)

    def wait_ready(self, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LINE.search(self.out.read_text())
            if match:
                return match
            assert self.proc.poll() is None, f"fundusrt review exited {self.proc.returncode}:\n{self.err.read_text()}"
            time.sleep(0.1)
        raise AssertionError(f"fundusrt review did not start:\n{self.err.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def review(results: Results, tmp_path: Path) -> Iterator[tuple[ReviewProcess, str, str]]:
    """`fundusrt review` over a copy of the results: (process, url, token)."""
    folder = tmp_path / "results"
    shutil.copytree(results.folder, folder)
    process = ReviewProcess(tmp_path, str(folder), "--port", "0", "--organization", "Test Eye Clinic")
    try:
        ready = process.wait_ready()
        token = re.search(r"the token (\S+)", ready["how"])[1]
        yield process, ready["url"], token
    finally:
        process.stop()


class Client:
    """A cookie-keeping HTTP client (urllib) that does not follow redirects."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    def __init__(self, base: str, context: Any = None) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar), self._NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, form: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base.rstrip("/") + path, data=data, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode(errors="replace")

    def csrf(self, path: str = "/login") -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.request(path)[2])[1]


# ---------------------------------------------------------------- sign-in

def test_password_hashes_and_user_lists(tmp_path: Path) -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$") and check_password("correct horse", stored)
    assert not check_password("wrong horse", stored)
    assert hash_password("same") != hash_password("same")  # salted
    users = tmp_path / "users"
    users.write_text(f"# graders\njdoe:{stored}:Doe^Jane\n\n")
    assert load_users(users)["jdoe"].name == "Doe^Jane"
    for text, message in ((f"jdoe:{stored}\n", "line 1: expected login:scrypt"),
                          ("jdoe:plain:Doe^Jane\n", "line 1: expected login:scrypt"),
                          (f"jdoe:{stored}:A^B\njdoe:{stored}:C^D\n", "line 2: login 'jdoe' appears twice"),
                          ("# nobody\n", "lists no users")):
        users.write_text(text)
        with pytest.raises(UsersFileError, match=re.escape(message)):
            load_users(users)
    with pytest.raises(UsersFileError, match="cannot read the user list"):
        load_users(tmp_path / "missing")


# ---------------------------------------------------------------- the sign-off SR

def test_signoff_sr_is_valid_and_references_the_ai_sr(results: Results, tmp_path: Path) -> None:
    study = results.studies[1]  # seed 7: left eye refer, right eye no referral
    report = results.reports[study.study_instance_uid]
    (ai_path,) = (results.folder / "run7").glob("SR_*.dcm")
    ai = pydicom.dcmread(ai_path)
    eyes = {"R": {"ai": "no_refer", "decision": "refer", "action": "overridden", "reason": "new vessels at the disc"},
            "L": {"ai": "refer", "decision": "refer", "action": "confirmed", "reason": ""}}
    sr = build_signoff_sr(ai, eyes, {e: v["images"] for e, v in report["eyes"].items()}, "Jane Doe", "jdoe",
                          "Test Eye Clinic")
    path = tmp_path / "so.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == COMPREHENSIVE_SR and back.SOPInstanceUID != ai.SOPInstanceUID
    assert predecessor_uids(back) == {ai.SOPInstanceUID}
    assert evidence_uids(back) == {ai.SOPInstanceUID} | set(study.instances)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert back.get(keyword) == ai.get(keyword), keyword
    assert (back.VerificationFlag, back.CompletionFlag) == ("VERIFIED", "COMPLETE")
    assert back.VerifyingObserverSequence[0].VerifyingObserverName == "Doe^Jane"
    assert back.VerifyingObserverSequence[0].VerifyingOrganization == "Test Eye Clinic"
    observer = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in back.ContentSequence
                if item.RelationshipType == "HAS OBS CONTEXT"}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121006"  # Person
    assert observer["Person Observer Name"].PersonName == "Doe^Jane"
    evaluations = eye_evaluations(back)
    assert evaluations["R"]["screen-decision"] == DECISION_CODES["refer"][0]
    assert evaluations["R"]["ai-decision"] == DECISION_CODES["no_refer"][0]
    assert evaluations["R"]["signoff"] == "overridden" and evaluations["R"]["comment"] == "new vessels at the disc"
    assert evaluations["L"]["signoff"] == "confirmed" and "comment" not in evaluations["L"]


def test_signoff_sr_refuses_an_override_without_reason_and_unknown_values(results: Results) -> None:
    (ai_path,) = (results.folder / "run5").glob("SR_*.dcm")
    ai = pydicom.dcmread(ai_path)
    for eyes, message in (({"R": {"ai": "no_refer", "decision": "refer", "action": "overridden", "reason": " "}},
                           "right eye: overriding the algorithm's decision needs a reason"),
                          ({"R": {"ai": "no_refer", "decision": "maybe", "action": "overridden", "reason": "x"}},
                           "right eye: decision decision 'maybe' is not one of"),
                          ({"X": {"ai": "no_refer", "decision": "refer", "action": "overridden", "reason": "x"}},
                           "unknown eye 'X'"),
                          ({}, "a sign-off needs at least one eye")):
        with pytest.raises(ResultWriteError, match=re.escape(message)):
            build_signoff_sr(ai, eyes, {}, "Jane Doe", "jdoe", "clinic")
    assert person_name("Jane  van Doe") == "Doe^Jane van" and person_name("Bono") == "Bono^"
    assert person_name("Doe^Jane") == "Doe^Jane"


# ---------------------------------------------------------------- HTTP: refusals, the user list, TLS

def test_requests_without_login_or_csrf_token_are_refused(results: Results, tmp_path: Path) -> None:
    from fundusrt.node.review.app import ReviewApp
    from fundusrt.node.review.auth import Authenticator
    from fundusrt.node.review.server import ReviewServer
    from fundusrt.node.review.sources import FolderSource

    folder = tmp_path / "results"
    shutil.copytree(results.folder, folder)
    (folder / "broken").mkdir()
    (folder / "broken" / "report_1.2.3.json").write_text('{"images": [')  # one bad file hides only itself
    users = tmp_path / "users"
    users.write_text(f"jdoe:{hash_password('s3cret pass')}:Doe^Jane\n")
    source = FolderSource(folder)
    server = ReviewServer(ReviewApp(source, Authenticator(load_users(users)), "Test Eye Clinic"), port=0)
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        study = results.studies[1].study_instance_uid
        anonymous = Client(server.url)
        status, headers, _ = anonymous.request("/")
        assert status == 303 and headers["location"] == "/login"
        for path in ("/api/studies", f"/api/studies/{study}"):
            assert anonymous.request(path)[0] == 401
        assert anonymous.request(f"/study/{study}/signoff", {"csrf": anonymous.csrf(), "decision.R": "refer"})[0] == 401

        client = Client(server.url)
        assert client.request("/login", {"login": "jdoe", "secret": "s3cret pass"})[0] == 403  # no CSRF token
        status, _, body = client.request("/login", {"csrf": client.csrf(), "login": "jdoe", "secret": "wrong"})
        assert status == 401 and "Wrong name/login" in body
        status, headers, _ = client.request("/login", {"csrf": client.csrf(), "login": "jdoe", "secret": "s3cret pass"})
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        status, headers, body = client.request("/api/studies")
        assert status == 200 and "no-store" in headers["cache-control"]
        assert {s["study_uid"] for s in json.loads(body)["studies"]} == set(results.reports)
        page = client.request(f"/study/{study}")[2]
        csrf, ai_sr = (re.search(rf'name="{n}" value="([^"]+)"', page)[1] for n in ("csrf", "ai_sr"))
        form = {"ai_sr": ai_sr, "decision.R": "refer", "reason.R": "seen", "decision.L": "refer"}
        assert client.request(f"/study/{study}/signoff", form)[0] == 403
        assert client.request(f"/study/{study}/signoff", {**form, "csrf": "forged"})[0] == 403
        status, _, body = client.request(f"/study/{study}/signoff", {**form, "csrf": csrf, "reason.R": ""})
        assert status == 400 and "needs a reason" in body
        status, _, body = client.request(f"/study/{study}/signoff", {**form, "csrf": csrf, "ai_sr": "1.2.3"})
        assert status == 409 and "changed since this page was opened" in body
        assert not list(folder.rglob("SO_*.dcm")) and source.state.signoffs() == []
        status, headers, _ = client.request(f"/study/{study}/signoff", {**form, "csrf": csrf})
        assert status == 303 and "?signed=" in headers["location"]
        (signoff,) = source.state.signoffs()  # on record when the page said so
        assert signoff.grader == "Doe^Jane" and signoff.eyes["R"]["action"] == "overridden"
        assert Path(signoff.path).is_file()
        deadline = time.monotonic() + 10  # no destination: delivered where it was written, in the background
        while source.state.signoffs(undelivered=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.state.signoffs(undelivered=True) == []
        assert client.request(f"/image/{study}/1.2.3/0")[0] == 404
        stolen = list(client.jar)  # a copy of the session cookie is worthless once its session signed out
        assert client.request("/logout", {"csrf": csrf})[0] == 303
        replay = Client(server.url)
        for cookie in stolen:
            replay.jar.set_cookie(cookie)
        assert replay.request("/api/studies")[0] == 401
    finally:
        server.stop()
        source.close()
    audit = [json.loads(line) for line in (folder / "review-audit.log").read_text().splitlines()]
    assert [r["event"] for r in audit] == ["login_failed", "login", "signed_off", "logout"]
    assert audit[2]["study_instance_uid"] == study and audit[2]["grader"] == "jdoe"
    text = (folder / "review-audit.log").read_text()
    for s in results.studies:
        assert s.patient_name not in text and s.patient_id not in text


def test_node_worklist_shows_each_state_and_why_a_study_failed(results: Results, tmp_path: Path) -> None:
    from fundusrt.node import Node, NodeConfig
    from fundusrt.node.review.auth import Authenticator
    from fundusrt.node.review.app import ReviewApp
    from fundusrt.node.review.server import ReviewServer
    from fundusrt.node.review.sources import NodeSource

    good, bad = results.studies
    reports = {good.study_instance_uid: results.reports[good.study_instance_uid]}

    def process(study_dir: Path) -> dict[str, Any]:  # the ground-truth report, or the failure a run can meet
        if study_dir.name not in reports:
            raise ValueError("no readable fundus image in the study")
        return reports[study_dir.name]

    (tmp_path / "watch").mkdir()  # instances go in through node.ingest, as the SCP hands them over
    node = Node(NodeConfig(spool=tmp_path / "spool", port=None, watch_dir=tmp_path / "watch", quiet_seconds=0,
                           output_dir=tmp_path / "out"), process)
    review = ReviewApp(NodeSource(node), Authenticator(), "Test Eye Clinic")
    server = ReviewServer(review, port=0)
    try:
        for path in bad.files[:1]:
            node.ingest(path.read_bytes())  # not started yet: the study waits as received
        server.start()
        client = Client(server.url)
        client.request("/login", {"csrf": client.csrf(), "login": "Jane Doe", "secret": review.auth.token})

        def listed() -> dict[str, dict[str, Any]]:
            return {s["study_uid"]: s for s in json.loads(client.request("/api/studies")[2])["studies"]}

        row = listed()[bad.study_instance_uid]
        assert row["status"] == "received" and row["patient_id"] == bad.patient_id and row["decision"] is None
        assert 'id="no-result"' in client.request(f"/study/{bad.study_instance_uid}")[2]
        for path in good.files:
            node.ingest(path.read_bytes())
        node.start()
        assert node.wait_until_idle(60)
        rows = listed()
        assert rows[bad.study_instance_uid]["status"] == "failed"
        assert "no readable fundus image" in rows[bad.study_instance_uid]["reason"]
        assert rows[good.study_instance_uid]["status"] == "done"
        assert rows[good.study_instance_uid]["decision"] == reports[good.study_instance_uid]["screening"]["decision"]
        page = client.request(f"/study/{good.study_instance_uid}")[2]
        csrf, ai_sr = (re.search(rf'name="{n}" value="([^"]+)"', page)[1] for n in ("csrf", "ai_sr"))
        form = {"csrf": csrf, "ai_sr": ai_sr, "decision.R": "no_refer", "decision.L": "no_refer"}
        assert client.request(f"/study/{good.study_instance_uid}/signoff", form)[0] == 303  # both confirmed
        deadline = time.monotonic() + 10  # delivered where the node sends results: the output folder
        while not list((tmp_path / "out").glob("*/SO_*.dcm")) and time.monotonic() < deadline:
            time.sleep(0.05)
        (delivered,) = (tmp_path / "out" / good.study_instance_uid).glob("SO_*.dcm")
        assert delivered.read_bytes() == Path(node.state.signoffs()[0].path).read_bytes()
        assert client.request(f"/study/{bad.study_instance_uid}/signoff", form)[0] == 409  # nothing to sign off
    finally:
        server.stop()
        node.stop()


def test_review_serves_https_with_secure_cookies(results: Results, tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="certificates for the TLS test are made with cryptography")
    import ssl

    from tests.test_node_tls import make_pki

    pki = make_pki(tmp_path / "pki", "clinic")
    process = ReviewProcess(tmp_path, str(results.folder), "--port", "0", "--tls-cert", str(pki.server_cert),
                            "--tls-key", str(pki.server_key))
    try:
        ready = process.wait_ready()
        assert ready["url"].startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(pki.ca))
        client = Client(ready["url"], context)
        token = re.search(r"the token (\S+)", ready["how"])[1]
        status, headers, _ = client.request("/login", {"csrf": client.csrf(), "login": "Jane Doe", "secret": token})
        assert status == 303 and "secure" in headers["set-cookie"].lower()
        assert client.request("/api/studies")[0] == 200
    finally:
        process.stop()


def test_review_reports_bad_settings(tmp_path: Path) -> None:
    def review(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fundusrt.cli", "review", *args], capture_output=True, text=True,
                              timeout=60)

    proc = review(str(tmp_path / "missing"), "--port", "0")
    assert proc.returncode == 2 and "is not a folder of results" in proc.stderr
    (tmp_path / "users").write_text("jdoe:nohash\n")
    proc = review(str(tmp_path), "--port", "0", "--users", str(tmp_path / "users"))
    assert proc.returncode == 2 and "line 1: expected login:scrypt" in proc.stderr
    assert "Traceback" not in proc.stderr
    # `serve --ui` says so before it loads the package (which does not even exist here)
    proc = subprocess.run([sys.executable, "-m", "fundusrt.cli", "serve", "--package", str(tmp_path / "nowhere"),
                           "--spool", str(tmp_path / "spool"), "--out", str(tmp_path / "out"), "--ui",
                           "--ui-users", str(tmp_path / "users")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "line 1: expected login:scrypt" in proc.stderr, proc.stderr
    # the hash field of a user list line, from a password typed twice (read from stdin without a terminal)
    proc = subprocess.run([sys.executable, "-m", "fundusrt.cli", "review", "--hash-password"], input="pw 1\npw 1\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and check_password("pw 1", proc.stdout.strip())


# ---------------------------------------------------------------- in a real browser

def test_review_in_the_browser_sign_off_overrides_one_eye(review: tuple, results: Results) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    process, url, token = review
    folder = Path(process.proc.args[4])
    refer_study = results.studies[1]  # seed 7: left eye refer, right eye no referral
    driver = chrome()
    try:
        sign_in(driver, url, "Jane Doe", token)
        wait_for(driver, lambda d: len(rows(d)) == 2, message="the worklist does not list both studies")
        for study in results.studies:  # the grader sees who it is
            assert any(study.patient_name in r["text"] and study.patient_id in r["text"] for r in rows(driver))
        driver.find_element(By.CSS_SELECTOR, "[data-filter=referable]").click()
        wait_for(driver, lambda d: [r["study"] for r in rows(d)] == [refer_study.study_instance_uid],
                 message="the referable filter does not keep just the referred study")
        driver.find_element(By.CSS_SELECTOR, "[data-filter=referable]").click()

        link = f"tr[data-study='{refer_study.study_instance_uid}'] a"
        wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, link).click() or True)  # retried after a redraw
        wait_for(driver, lambda d: d.find_elements(By.ID, "study") and images_loaded(d), message="images not drawn")
        images = driver.find_elements(By.CSS_SELECTOR, "img.fundus")
        assert len(images) == len(refer_study.instances)
        shots = [image.screenshot_as_png for image in images]
        assert all(colour_pixels(png, ROI_GREEN) > 50 for png in shots)  # the field of view outlined on each
        lesion_colours = [c for kind, c in BOX_COLOURS.items() if kind != "optic_disc"]
        assert sum(colour_pixels(png, c, 30) for png in shots for c in lesion_colours) > 20  # lesion boxes drawn
        assert "laterality" in driver.find_element(By.ID, "eye-L").text  # the protocol's answers are listed
        driver.execute_script("window.scrollTo(0, 0)")  # the element screenshots scrolled the page
        save_screenshot(driver, "review-study.png")

        ai_sr = next(folder.glob("run7/SR_*.dcm"))
        ai_bytes = hashlib.sha256(ai_sr.read_bytes()).hexdigest()
        Select(driver.find_element(By.ID, "decision-R")).select_by_value("refer")
        driver.find_element(By.ID, "sign-off").click()  # no reason: the page asks for one and sends nothing
        assert driver.find_elements(By.ID, "signed") == [] and not list(folder.rglob("SO_*.dcm"))
        driver.find_element(By.ID, "reason-R").send_keys("new vessels at the disc")
        driver.find_element(By.ID, "sign-off").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "signed"), message="no confirmation of the sign-off")
        history = driver.find_element(By.ID, "signoffs").text
        assert "Right eye (OD) overridden (Refer): “new vessels at the disc”" in history
        assert "Left eye (OS) confirmed" in history
        assert refused_without_csrf(driver, f"/study/{refer_study.study_instance_uid}/signoff") == 403

        driver.get(url)
        wait_for(driver, lambda d: any("overridden by Jane Doe" in r["text"] for r in rows(d)),
                 message="the worklist does not show the sign-off")
        driver.find_element(By.CSS_SELECTOR, "[data-filter=unsigned]").click()
        wait_for(driver, lambda d: [r["study"] for r in rows(d)]
                 == [results.studies[0].study_instance_uid], message="the not-signed-off filter is wrong")
        driver.find_element(By.CSS_SELECTOR, "[data-filter=unsigned]").click()
        wait_for(driver, lambda d: len(rows(d)) == 2)
        save_screenshot(driver, "review-worklist.png")
    finally:
        driver.quit()

    (so_path,) = folder.rglob("SO_*.dcm")
    assert so_path.parent == ai_sr.parent
    assert dciodvfy_errors(so_path) == []
    so = pydicom.dcmread(so_path)
    assert predecessor_uids(so) == {pydicom.dcmread(ai_sr, stop_before_pixels=True).SOPInstanceUID}
    assert eye_evaluations(so)["R"]["signoff"] == "overridden" and eye_evaluations(so)["L"]["signoff"] == "confirmed"
    assert so.VerifyingObserverSequence[0].VerifyingObserverName == "Doe^Jane"
    assert hashlib.sha256(ai_sr.read_bytes()).hexdigest() == ai_bytes  # the AI's result is never altered
    assert process.stop() == 0
    logs = process.out.read_text() + process.err.read_text() + (folder / "review-audit.log").read_text()
    for study in results.studies:
        assert study.patient_name not in logs and study.patient_id not in logs
