#!/usr/bin/env bash
# Build the virtual environment that holds PanDA's own pilot 3 and panda-client for tests/compat.
# Pilot 3's top-level package is called `pilot` like ours, so it lives in a venv of its own, made
# with the system python (/usr/bin/python3) so that an unprivileged user can run it. PyPI's wheel
# lacks the launcher pilot.py: it comes from the source archive, unpacked into $VENV/pilot3-src.
# Rucio's client (rucio-clients) goes in beside them: pilot 3 looks its inputs up through it
# (this server answers under /rucio; it is not a dependency of panda-wms itself).
# Idempotent: does nothing when $VENV/.ready names the wanted versions (and $VENV/.rucio-ready
# the Rucio client's: a file of its own, so that a copy of this script from before Rucio's
# client was added still finds the venv ready instead of rebuilding it under running tests);
# a venv made before rucio-clients was added only gets it installed.
set -euo pipefail
VENV=${1:-/var/tmp/panda-wms-pilot3-venv}
PILOT_VERSION=${PANDA_PILOT_VERSION:-3.7.0.36}
CLIENT_VERSION=${PANDA_CLIENT_VERSION:-2.2.0}
RUCIO_VERSION=${RUCIO_CLIENTS_VERSION:-41.5.1}
WANT="panda-pilot==$PILOT_VERSION panda-client==$CLIENT_VERSION"
WANT_RUCIO="rucio-clients==$RUCIO_VERSION"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"            # test sessions running at once build it once, one after the other
flock 9
if [ -f "$VENV/.ready" ] && [ "$(cat "$VENV/.ready")" = "$WANT" ]; then
    if [ ! -f "$VENV/.rucio-ready" ] || [ "$(cat "$VENV/.rucio-ready")" != "$WANT_RUCIO" ]; then
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$WANT_RUCIO"
        chmod -R a+rX "$VENV"
        echo "$WANT_RUCIO" > "$VENV/.rucio-ready"
        echo "compat-venv: $WANT_RUCIO added to $VENV"
    fi
    exit 0
fi
PY=/usr/bin/python3
[ -x "$PY" ] || { echo "compat-venv: $PY is missing (install Debian python3 and python3-venv)" >&2; exit 2; }
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "panda-pilot==$PILOT_VERSION" \
    "panda-client==$CLIENT_VERSION" "$WANT_RUCIO"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$tmp" "panda-pilot==$PILOT_VERSION"
tar -xzf "$tmp"/panda[-_]pilot-"$PILOT_VERSION".tar.gz -C "$tmp"
mkdir -p "$VENV/pilot3-src"
cp -r "$tmp/panda-pilot-$PILOT_VERSION/pilot.py" "$tmp/panda-pilot-$PILOT_VERSION/pilot" \
    "$VENV/pilot3-src/"
[ -f "$tmp/panda-pilot-$PILOT_VERSION/PILOTVERSION" ] && cp "$tmp/panda-pilot-$PILOT_VERSION/PILOTVERSION" "$VENV/pilot3-src/"
chmod -R a+rX "$VENV"
echo "$WANT_RUCIO" > "$VENV/.rucio-ready"
echo "$WANT" > "$VENV/.ready"
echo "compat-venv: $WANT $WANT_RUCIO ready in $VENV"
