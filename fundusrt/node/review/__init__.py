"""The clinic's review page: a worklist of screened studies, images with findings, and a grader's sign-off.

Served by `fundusrt serve --ui` (the live node) and `fundusrt review DIR` (results of `fundusrt run
--dicom-out`). Starlette + Jinja2 templates + plain JavaScript, run by uvicorn (the `[ui]` extra).

- `sources`: where studies come from (the node's state, or a results folder), one interface;
- `auth`: token or user-list login (scrypt hashes), session and CSRF checks;
- `render`: images drawn from the DICOM with the field of view and lesion boxes, cached;
- `signing`: a sign-off stored (SQLite, committed), written as SR, delivered;
- `app`: the web application; `server`: uvicorn on a bound socket, in a thread.
"""
