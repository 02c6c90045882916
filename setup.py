"""panda-wms: a Python re-creation of PanDA's workload management system.

Plugins are entry points: a new copytool or scheduler backend is one class and one line below.
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
SERVER_PLUGINS: list[str] = []
DATA_MOVERS = [
    "local = server.dataservice:LocalMover",
]

setup(
    name="panda-wms",
    version="0.1.0",
    description="Production and Distributed Analysis workload management: server, pilot, "
    "copytools, schedulers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["panda_core*", "panda_wms*", "pilot*", "copytools*", "server*",
                                    "schedulers*", "site_configs*"]),
    package_data={"site_configs": ["*.yaml", "examples/*.yaml", "*.json"],
                  "server": ["templates/*.html", "static/*", "alembic.ini",
                             "migrations/*.py", "migrations/*.mako",
                             "migrations/versions/*.py"]},
    install_requires=[
        "pluggy>=1.3",
        "stevedore>=5.0",
        "tornado>=6.3",
        "sqlalchemy>=2.0",
        "alembic>=1.12",
        "requests>=2.28",
        "psutil>=6.0",     # Process.net_connections
        "PyYAML>=6.0",
        "jsonschema>=4.17",
        "cryptography>=41",
        "prometheus-client>=0.17",  # /metrics exposition format, done right
        "isal>=1.6",
    ],
    extras_require={
        "postgres": ["psycopg[binary]>=3.1"],
        "mysql": ["pymysql>=1.1"],
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "responses>=0.24",
            "psycopg[binary]>=3.1",
            "pymysql>=1.1",
        ],
    },
    entry_points={
        "console_scripts": ["panda = panda_wms.cli:main"],
        "panda.copytools": COPYTOOLS,
        "panda.schedulers": SCHEDULERS,
        "panda.pilot": PILOT_PLUGINS,
        "panda.server": SERVER_PLUGINS,
        "panda.datamovers": DATA_MOVERS,
    },
)
