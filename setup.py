"""panda-wms: a Python re-creation of PanDA's workload management system.

Plugins are entry points: a new copytool or scheduler backend is one class and one line below.
Installs by role: the base install is a worker node's (the pilot and the copytools); each other
role is an extra (README.md, "Installs by role").
"""
from setuptools import find_packages, setup

COPYTOOLS = [
    "cp = copytools.local:CpTool",
    "mv = copytools.local:MvTool",
    "symlink = copytools.local:SymlinkTool",
    "http = copytools.webdav:HttpTool",
    "xrdcp = copytools.xrootd:XrdcpTool",
    "gfal = copytools.gfal:GfalTool",
]
SCHEDULERS = [
    "local = schedulers.local:LocalBackend",
    "slurm = schedulers.slurm:SlurmBackend",
    "arc = schedulers.arc:ArcBackend",
    "htcondor = schedulers.htcondor:HTCondorBackend",
]
PILOT_PLUGINS = [
    "looping = pilot.monitors.looping",
    "memory = pilot.monitors.memory",
    "disk = pilot.monitors.disk",
    "walltime = pilot.monitors.walltime",
    "stdout = pilot.monitors.stdout",
]
SANDBOXES = [
    "none = pilot.sandbox.none:NoSandbox",
    "bwrap = pilot.sandbox.bwrap:BwrapSandbox",
    "apptainer = pilot.sandbox.apptainer:ApptainerSandbox",
]
SERVER_PLUGINS: list[str] = []
DATA_MOVERS = [
    "local = server.datamovers.local:LocalMover",
    "http = server.datamovers.http:HttpMover",
    "xrootd = server.datamovers.xrootd:XrootdMover",
]

# What a worker node needs: the pilot (pluggy, psutil), the copytools (stevedore, requests for
# http, isal for a fast adler32), the client commands and the schedulers (cryptography: ARC).
BASE = [
    "pluggy>=1.3",
    "stevedore>=5.0",
    "requests>=2.28",
    "psutil>=6.0",     # Process.net_connections
    "cryptography>=41",
    "isal>=1.6",
]
# One list per role; `panda COMMAND` names the extra it misses (panda_wms/cli.py, EXTRA_MODULES).
SERVER = [
    "tornado>=6.3",
    "sqlalchemy>=2.0",
    "alembic>=1.12",
    "prometheus-client>=0.17",  # /metrics exposition format, done right
    "jsonschema>=4.17",         # site configs
    "PyYAML>=6.0",
    "PyJWT>=2.8",               # WLCG-profile bearer tokens, JWKS of external OIDC issuers
]
FACTORY = ["PyYAML>=6.0", "jsonschema>=4.17"]   # site configs (schedulers/ needs only the base)
SE = ["tornado>=6.3"]
# panda submit of a YAML task file; the tables of panda jobs/tasks/job/data (tabulate: plain
# columns that grep and awk take apart, one small pure-Python package; rich would add
# markdown-it-py and pygments for boxes and colours the commands do not need)
CLIENT = ["PyYAML>=6.0", "tabulate>=0.9"]
POSTGRES = ["psycopg[binary]>=3.1"]
MYSQL = ["pymysql>=1.1"]
ALL = sorted(set(SERVER + FACTORY + SE + CLIENT + POSTGRES + MYSQL))

setup(
    name="panda-wms",
    version="0.1.0",
    description="Production and Distributed Analysis workload management: server, pilot, "
    "copytools, schedulers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["panda_core*", "panda_wms*", "pilot*", "copytools*",
                                    "server*", "schedulers*", "site_configs*",
                                    "storage_element*"]),
    package_data={"site_configs": ["*.yaml", "examples/*.yaml", "*.json"],
                  "server.monitor": ["templates/*.html", "static/*"],
                  "server": ["alembic.ini",
                             "migrations/*.py", "migrations/*.mako",
                             "migrations/versions/*.py"]},
    install_requires=BASE,
    extras_require={
        "server": SERVER,
        "factory": FACTORY,
        "se": SE,
        "client": CLIENT,
        "postgres": POSTGRES,
        "mysql": MYSQL,
        "all": ALL,
        # selenium drives Debian's chromium for the monitor's browser tests; aiosmtpd is a
        # real SMTP server for the alarm e-mails
        # schemathesis (with hypothesis): the API fuzzed from its OpenAPI document
        # pytest-xdist: scripts/test-all.sh runs the suite in 4 worker processes (most tests
        # wait on servers, pilots and batch systems, not on the CPU: ~21 min serial)
        "test": ALL + ["pytest>=7.4", "pytest-timeout>=2.2", "responses>=0.24",
                       "selenium>=4.10", "aiosmtpd>=1.4", "schemathesis>=4.0",
                       "hypothesis>=6.100", "pytest-xdist>=3.5"],
    },
    entry_points={
        "console_scripts": ["panda = panda_wms.cli:main"],
        "panda.copytools": COPYTOOLS,
        "panda.schedulers": SCHEDULERS,
        "panda.pilot": PILOT_PLUGINS,
        "panda.sandboxes": SANDBOXES,
        "panda.server": SERVER_PLUGINS,
        "panda.datamovers": DATA_MOVERS,
    },
)
