"""Bulk API methods (task submission) run on threads of their own: a submission that takes
minutes does not hold the threads every other request needs. ``panda simulate``'s large
scenario found it: twenty 5,000-job tasks took all of them and no updateJob was answered."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from server.app import BULK_THREADS, build_state, make_app
from server.submission import SubmitResult


def test_a_long_submission_leaves_the_request_threads_free(db_url, tmp_path):
    state = build_state(db_url, str(tmp_path / "keys"), threads=1)
    token = state.keys.issue_token("tester", "admin")
    entered, release = threading.Event(), threading.Event()

    def slow_submit(params, owner, **kw):             # a task whose jobs take long to create
        entered.set()
        assert release.wait(10), "the test never released the submission"
        return SubmitResult(7, [1, 2], 2, 0)

    state.submitter.submit = slow_submit
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def main():
        from tornado.httpclient import AsyncHTTPClient

        server = make_app(state).listen(0, "127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        url = f"http://127.0.0.1:{port}/api/v1"
        client = AsyncHTTPClient(force_instance=True)
        try:
            submits = [asyncio.ensure_future(client.fetch(
                f"{url}/task/submit", method="POST", headers=headers,
                body=json.dumps({"task_parameters": {"name": f"t{i}"}})))
                for i in range(BULK_THREADS)]
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            # the one request thread is free: this call (run there) is answered at once
            reply = await client.fetch(f"{url}/system/whoami", headers=headers,
                                       request_timeout=5)
            assert json.loads(reply.body)["data"]["subject"] == "tester"
            assert not any(s.done() for s in submits)
            release.set()
            for s in submits:
                body = json.loads((await s).body)
                assert body["success"] and body["data"] == 7, body
        finally:
            release.set()
            client.close()
            server.stop()

    try:
        asyncio.run(main())
    finally:
        state.executor.shutdown(wait=False)
        state.tb.engine.dispose()


@pytest.mark.parametrize("name", [("task", "submit"), ("task", "extend"), ("job", "submit")])
def test_the_methods_that_create_jobs_are_bulk(name):
    from server.apibase import registry
    from server.app import API_MODULES
    methods = registry(API_MODULES)
    assert methods[name].bulk
    assert not methods[("system", "whoami")].bulk
