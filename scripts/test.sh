#!/usr/bin/env bash
# Installs everything into .venv, then runs the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
scripts/install.sh
exec .venv/bin/python -m pytest "$@"
