#!/usr/bin/env bash
# Install the Node dependencies (from package-lock.json) and build dist/ when they are missing or stale.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "vmbackup: installing Node dependencies (npm ci)" >&2
  npm ci --no-audit --no-fund --ignore-scripts >&2
fi
echo "vmbackup: building dist/" >&2
npm run --silent build >&2
