"""panda_core.workernode: the pilot's description of its node and what the server keeps of it."""
from __future__ import annotations

import json

from panda_core import workernode
from panda_core.workernode import WorkerNode, parse


def test_round_trip_into_columns():
    node = WorkerNode(node="wn1", cpu_model="AMD EPYC 7742", cores=128, mem_mb=515000,
                      mem_available_mb=400000, load1=3.5, disk_free_mb=123456,
                      pilot_version="panda-wms-pilot 0.1+0.1.0-abc")
    assert parse(node.to_json()) == {
        "node": "wn1", "wn_cpu_model": "AMD EPYC 7742", "wn_cores": 128, "wn_mem_mb": 515000,
        "wn_mem_available_mb": 400000, "wn_load1": 3.5, "wn_disk_free_mb": 123456,
        "wn_pilot_version": "panda-wms-pilot 0.1+0.1.0-abc"}
    assert parse(WorkerNode().to_json()) == {}


def test_hostile_values_are_dropped_one_by_one_and_the_rest_kept():
    text = json.dumps({"cpu_model": "x" * 1000 + "\x00\n", "cores": True, "mem_mb": -1,
                       "mem_available_mb": 2.5, "load1": float("nan"), "disk_free_mb": 10**30,
                       "pilot_version": ["list"], "node": "\u202ewn\x07", "extra": "ignored"})
    got = parse(text)
    assert got == {"wn_cpu_model": "x" * 128, "node": "wn"}
    assert parse(json.dumps({"load1": 1e300})) == {}
    assert parse(json.dumps({"cores": 8.0})) == {"wn_cores": 8}


def test_what_is_not_a_json_object_is_ignored():
    for bad in (None, "", "not json", "[1, 2]", "42", '"text"', 7, "{" * 10,
                json.dumps({"cpu_model": "y" * 5000})):
        assert parse(bad) == {}, bad


def test_the_server_takes_the_update_with_any_worker_node_field():
    from server.dispatcher import REPORT_COLUMNS, Dispatcher

    base = {"jobId": "7", "state": "running"}
    req = Dispatcher._update_request(None, {**base, workernode.FIELD: "][garbage",
                                            "node": "from-form"})
    assert req.state == "running" and req.fields == {"node": "from-form"}
    req = Dispatcher._update_request(None, {**base, workernode.FIELD: WorkerNode(
        node="n", cpu_model="c", cores=2).to_json()})
    assert req.fields == {"node": "n", "wn_cpu_model": "c", "wn_cores": 2}
    assert {c for c, *_ in workernode.COLUMNS.values()} <= set(REPORT_COLUMNS) | {"node"}
