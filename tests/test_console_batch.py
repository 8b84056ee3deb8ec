"""The console's batch jobs (issue 16: "started on the hub, with status, progress and their output visible in the
console"), in a real chromium (Playwright, Debian's browser) over a real hub: a job started from the form scores a
Parquet file in the hub's sandboxed subprocess with real onnxruntime; a hanging job shows its progress while it
runs and is cancelled from its page; a refused start and a failed job show the hub's reasons."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from hub.testing import wait_until
from modules.examples import synthetic_inputs
from tests.test_batch_jobs import COLS, HANGING, register, table
from tests.test_console import TIMEOUT_MS, browser, sign_in  # noqa: F401  (browser: the fixture)


def test_batch_jobs_started_followed_and_cancelled_from_the_console(server, admin, browser, tmp_path):  # noqa: F811
    register(admin, tmp_path, "cb")
    src = table(tmp_path / "rows.parquet", synthetic_inputs(np.random.default_rng(5), 2000), 500)
    out = tmp_path / "scored.parquet"
    admin.post("/api/v1/models", data={"name": "hang-model"},
               files=[("files", ("weights.bin", b"\0" * 16))]).raise_for_status()
    admin.post("/api/v1/modules", json={"name": "hang", "models": ["hang-model:1"], "runtime": "python",
                                        "entry": HANGING, "entry_name": "score.py"}).raise_for_status()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        sign_in(page, server.url, server.admin_token)
        page.wait_for_selector("#nav:not([hidden])")
        page.click("#nav a[data-view=batch]")
        page.wait_for_selector("#view :text('no batch jobs')")

        # a start the hub refuses says why, and starts nothing
        page.fill("input[name=module]", "cb:1")
        page.fill("input[name=input]", str(tmp_path / "missing.parquet"))
        page.fill("input[name=output]", str(out))
        page.click("form[data-start] button[type=submit]")
        page.wait_for_selector("[data-start-error]:has-text('does not exist on the hub')")
        assert admin.get("/api/v1/batch-jobs").json() == []

        # started from the form: the job's page follows it to the end, with its rows, parts and output
        page.fill("input[name=input]", str(src))
        page.fill("input[name=columns]", "x=" + ",".join(COLS))
        page.click("form[data-start] button[type=submit]")
        page.wait_for_selector("#job-head [data-job-state=succeeded]", timeout=90_000)
        [job] = admin.get("/api/v1/batch-jobs").json()
        assert page.url.endswith(f"#/batch/{job['id']}") and job["created_by"]
        assert page.inner_text("#job-head [data-rows]") == "2,000 / 2,000 rows (100%), 1 part(s)"
        assert str(out) in page.inner_text("#job-head") and pq.read_table(out).num_rows == 2000
        page.wait_for_selector("[data-section=summary] tr[data-key=rows_per_s]")
        assert page.query_selector("#job-head button[data-cancel]") is None  # nothing to cancel when it ended

        # a job that hangs after its first batch: its progress shows while it runs, and it is cancelled from its page
        hang = admin.post("/api/v1/batch-jobs", json={"module": "hang:1", "input": str(src), "output": str(
            tmp_path / "never.parquet"), "columns": ["x=" + ",".join(COLS)], "batch_rows": 100}).json()
        page.click("#nav a[data-view=batch]")
        page.wait_for_selector(f"tr[data-job='{hang['id']}'][data-state=running]")
        page.wait_for_selector(f"tr[data-job='{job['id']}'][data-state=succeeded] :text('{out}')")
        page.click(f"tr[data-job='{hang['id']}'] a")
        page.wait_for_selector("#job-head [data-rows]:text-is('100 / 2,000 rows (5%)')")  # refreshed while it runs
        assert page.get_attribute("#job-head [role=progressbar]", "aria-valuenow") == "5"
        page.once("dialog", lambda d: d.accept())
        page.click("#job-head button[data-cancel]")
        page.wait_for_selector("#toast:has-text('cancelled')")
        page.wait_for_selector("#job-head [data-job-state=cancelled]")
        assert admin.get(f"/api/v1/batch-jobs/{hang['id']}").json()["state"] == "cancelled"
        assert not (tmp_path / "never.parquet").exists()

        # a job that fails shows the hub's reason in the list
        bad = admin.post("/api/v1/batch-jobs", json={"module": "cb:1", "input": str(src), "output": str(
            tmp_path / "bad.parquet"), "columns": ["x=f0,nope,f2,f3"]}).json()
        wait_until(lambda: admin.get(f"/api/v1/batch-jobs/{bad['id']}").json()["state"] == "failed", 60, 0.2,
                   "the job with a wrong column failing")
        page.click("#nav a[data-view=batch]")
        page.wait_for_selector(f"tr[data-job='{bad['id']}'][data-state=failed] td.error:has-text(\"column 'nope'\")")
        assert page.locator("tr[data-job]").count() == 3

        # a viewer sees the jobs but no start form and no cancel
        viewer = admin.post("/api/v1/tokens", json={"name": "batch-viewer", "role": "viewer"}).json()["token"]
        page.click("#logout")
        sign_in(page, server.url, viewer)
        page.wait_for_selector("#nav:not([hidden])")
        page.click("#nav a[data-view=batch]")
        page.wait_for_selector(f"tr[data-job='{job['id']}']")
        assert page.query_selector("form[data-start]") is None and page.query_selector("button[data-cancel]") is None
    finally:
        context.close()
