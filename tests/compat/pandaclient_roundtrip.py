"""Run inside the compat venv: PanDA's own client (pandaclient, unmodified) against our server.

argv: <site> <step>. Prints one JSON object with what each client call returned; the test
(test_compat_client.py) checks it. The environment (PANDA_URL_SSL, PANDA_AUTH=oidc, the token,
PANDA_BEHIND_REAL_LB=1) is set by the test.
"""
import datetime
import json
import os
import sys

from pandaclient import Client
from pandaclient.FileSpec import FileSpec
from pandaclient.JobSpec import JobSpec


def make_job(site: str, n: int) -> JobSpec:
    job = JobSpec()
    job.jobDefinitionID = 7
    job.jobName = f"compat client job {n}"
    job.transformation = "/bin/sh"
    job.jobParameters = "-c 'echo hi > out.txt'"
    job.computingSite = site
    job.prodSourceLabel = "user"
    job.assignedPriority = 900
    job.currentPriority = 900
    job.coreCount = 1
    job.minRamCount = 200
    job.maxCpuCount = 120
    job.creationTime = datetime.datetime(2026, 1, 2, 3, 4, 5)
    out = FileSpec()
    out.lfn = f"compat.{n}.out"
    out.type = "output"
    out.dataset = "compat.outputs"
    out.destinationDBlock = "compat.outputs"
    out.scope = "compat"
    job.addFile(out)
    return job


def main() -> None:
    site, step = sys.argv[1], sys.argv[2]
    result = {}
    if step == "jobs":
        result["hello"] = Client.hello()
        status, ids = Client.submitJobs([make_job(site, 1), make_job(site, 2)])
        result["submit"] = [status, ids]
        panda_ids = [i[0] for i in ids]
        status, jobs = Client.getJobStatus(panda_ids + [999999])
        result["status"] = [status, [None if j is None else
                                     {"PandaID": j.PandaID, "jobStatus": j.jobStatus,
                                      "computingSite": j.computingSite,
                                      "prodUserName": j.prodUserName,
                                      "transformation": j.transformation,
                                      "jobParameters": j.jobParameters,
                                      "jobsetID": j.jobsetID,
                                      "files": [[f.lfn, f.type] for f in j.Files]}
                                     for j in jobs]]
        result["kill"] = list(Client.killJobs(panda_ids[:1]))
        status, jobs = Client.getFullJobStatus(panda_ids)
        result["after_kill"] = [status, [j.jobStatus for j in jobs]]
    elif step == "task":
        params = json.loads(os.environ["COMPAT_TASK"])
        status, (code, message) = Client.insertTaskParams(params)
        result["insert"] = [status, code, message]
        task_id = int(message.split("jediTaskID=")[1].split()[0])
        result["task_id"] = task_id
        result["status"] = list(Client.getTaskStatus(task_id))
        result["params"] = list(Client.getTaskParamsMap(task_id))
        result["ids"] = list(Client.getPandaIDsWithTaskID(task_id))
        status, details = Client.getJediTaskDetails({"jediTaskID": task_id}, True, True)
        result["details"] = [status, {k: details.get(k) for k in ("jediTaskID", "status",
                                                                  "taskParams")}]
        since = (datetime.datetime.utcnow() - datetime.timedelta(hours=1)).strftime(
            "%Y-%m-%d %H:%M:%S")
        status, tasks = Client.getJobIDsJediTasksInTimeRange(since)
        result["since"] = [status, sorted(tasks) if isinstance(tasks, dict) else tasks]
        result["files"] = list(Client.get_files_in_datasets(task_id))
        result["kill"] = list(Client.killTask(task_id))
        result["status_after_kill"] = list(Client.getTaskStatus(task_id))
    elif step == "kill_other":
        result["kill_task"] = list(Client.killTask(int(sys.argv[3])))
        result["kill_jobs"] = list(Client.killJobs([int(sys.argv[4])]))
    elif step == "files":
        path = sys.argv[3]
        result["put"] = list(Client.putFile(path))
        out = path + ".back"
        result["get"] = list(Client.getFile(os.path.basename(path), output_path=out))
        with open(out, "rb") as f:
            result["back"] = f.read().decode()
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
