#!/usr/bin/env bash
# Indexer recall vs cost on real SmolLM2 attention: every registered family (>= 3 settings each) on the default
# traces, then the Pareto frontier and the query/key mismatch analysis. Writes README.md and figures here.
# Extra arguments go to `topklab recall` (e.g. --layers all). Re-running reuses finished work in results/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
.venv/bin/topklab recall --out "$here/results" "$@"
.venv/bin/python "$here/analyze.py" "$here/results" "$here"
