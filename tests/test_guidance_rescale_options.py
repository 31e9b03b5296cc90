"""diffusers' `guidance_rescale` (CFG rescale) from the native API, not only from Python.

The values themselves are diffusers' (`test_denoiser_guidance.py`, `test_folder_schedule.py`); here the API field
reaches the request and the picture records `CFG rescale`.
"""

from __future__ import annotations

import pytest
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_the_native_api_takes_it(sdlab_server):
    import httpx
    from server_fixtures import run_job

    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        job = run_job(client, {"prompt": "a red apple", "steps": 2, "seed": 7, "width": 32, "height": 32,
                               "guidance_rescale": 0.7})
        assert job["status"] == "done", job
        assert job["request"]["guidance_rescale"] == 0.7 and "CFG rescale: 0.7" in job["infotexts"][0]
        refused = client.post("/api/jobs", json={"prompt": "x", "guidance_rescale": 2})
        assert refused.status_code in (400, 422) and "guidance rescale" in refused.text
