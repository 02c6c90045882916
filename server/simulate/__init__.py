"""``panda simulate``: the real server and brokerage driven by simulated sites and pilots.

``workload`` (the file to replay), ``run`` (database, server, submission, sampling),
``pilots`` (asyncio pilots speaking the pilot protocol), ``report`` (measures, SVG plots, the
summary table), ``cli`` (the command). docs/simulate.md.
"""
