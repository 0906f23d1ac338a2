#!/usr/bin/env bash
# Imports epp-dashboard.json into Grafana through its HTTP API.
#
# POST /api/dashboards/db wants the dashboard wrapped: {"dashboard": {...}, "overwrite": true};
# posting the raw JSON model is rejected ("Dashboard title cannot be empty"). This script wraps
# it (with jq, or python3 when jq is missing), clears the numeric id so the import works on any
# Grafana, and keeps the uid so re-running it updates the same dashboard.
#
#   GRAFANA_URL=http://localhost:3000 GRAFANA_TOKEN=glsa_... deploy/monitoring/grafana/import-dashboard.sh
#   GRAFANA_URL=http://localhost:3000 GRAFANA_USER=admin GRAFANA_PASSWORD=... deploy/monitoring/grafana/import-dashboard.sh
#   deploy/monitoring/grafana/import-dashboard.sh --print   # only print the request body
#
# Environment:
#   GRAFANA_URL          Grafana base URL (default http://localhost:3000)
#   GRAFANA_TOKEN        service-account token (Bearer); or
#   GRAFANA_USER/GRAFANA_PASSWORD   basic auth
#   GRAFANA_FOLDER_UID   optional folder to import into
#   DASHBOARD            JSON model to import (default: epp-dashboard.json next to this script)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DASHBOARD=${DASHBOARD:-"$HERE/epp-dashboard.json"}
GRAFANA_URL=${GRAFANA_URL:-http://localhost:3000}
FOLDER_UID=${GRAFANA_FOLDER_UID:-}

wrap() {
  if command -v jq >/dev/null 2>&1; then
    jq --arg folder "$FOLDER_UID" \
      '{dashboard: (. + {id: null}), overwrite: true, message: "imported by import-dashboard.sh"}
       + (if $folder != "" then {folderUid: $folder} else {} end)' "$DASHBOARD"
  elif command -v python3 >/dev/null 2>&1; then
    python3 - "$DASHBOARD" "$FOLDER_UID" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    dash = json.load(f)
dash["id"] = None
body = {"dashboard": dash, "overwrite": True, "message": "imported by import-dashboard.sh"}
if sys.argv[2]:
    body["folderUid"] = sys.argv[2]
json.dump(body, sys.stdout, indent=2)
print()
PY
  else
    echo "import-dashboard.sh: needs jq or python3 to wrap the dashboard" >&2
    exit 1
  fi
}

if [ "${1:-}" = "--print" ]; then
  wrap
  exit 0
fi

auth=()
if [ -n "${GRAFANA_TOKEN:-}" ]; then
  auth=(-H "Authorization: Bearer $GRAFANA_TOKEN")
elif [ -n "${GRAFANA_USER:-}" ]; then
  auth=(-u "$GRAFANA_USER:${GRAFANA_PASSWORD:-}")
fi

body=$(mktemp)
trap 'rm -f "$body"' EXIT
wrap >"$body"

echo "POST $GRAFANA_URL/api/dashboards/db ($DASHBOARD)" >&2
# --fail-with-body: exit non-zero on HTTP errors but still show Grafana's message.
curl --silent --show-error --fail-with-body \
  -X POST "${auth[@]}" \
  -H "Content-Type: application/json" \
  --data-binary "@$body" \
  "${GRAFANA_URL%/}/api/dashboards/db"
echo
