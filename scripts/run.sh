#!/usr/bin/env bash
# Installs everything into .venv, then runs the project's default pipeline (or the `kedro run`
# arguments given, e.g. --pipelines=benchmarking).
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=1
scripts/install.sh
exec .venv/bin/kedro run "$@"
