#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole test suite.
# Python extras come from setup.py's [test]; Debian packages from tests/debian-packages.txt
# (installed with apt-get when run as root and not yet present). Extra pytest arguments pass through
# and win over the defaults below: `-n 0` runs the suite in this one process.
#
# 4 pytest-xdist workers (PANDA_TEST_WORKERS overrides): most tests wait on servers, pilots and
# batch systems rather than on the CPU, so 4 overlap well even on 2 cores. --dist loadscope keeps
# each module on one worker, so a module-scoped server, Slurm or XRootD starts once; modules are
# handed out in the order of tests/conftest.py (those with slow tests first), not by test count.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tests/debian-packages.txt)
    missing=()
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

set +e
python3 -m pytest -n "${PANDA_TEST_WORKERS:-4}" --dist loadscope --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests (exit 5): nothing was selected" >&2
fi
exit "$rc"
