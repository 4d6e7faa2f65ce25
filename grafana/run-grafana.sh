#!/bin/sh
# Start Grafana with the connector's provisioning: data source and dashboards, no clicks needed.
#
#   PROMETHEUS_URL=http://127.0.0.1:9090 grafana/run-grafana.sh [extra grafana-server args]
#
# Sets the defaults Grafana's provisioning files cannot express (PROMETHEUS_URL, the absolute
# dashboards path), points Grafana's provisioning at grafana/provisioning and opens the cluster
# overview as the home dashboard. GF_* variables already set in the environment win.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${PROMETHEUS_URL:=http://127.0.0.1:9090}"
: "${CONNECTOR_DASHBOARDS_DIR:=$here/dashboards}"
: "${GF_PATHS_PROVISIONING:=$here/provisioning}"
: "${GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH:=$here/dashboards/cluster-overview.json}"
export PROMETHEUS_URL CONNECTOR_DASHBOARDS_DIR GF_PATHS_PROVISIONING GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH
if command -v grafana >/dev/null 2>&1; then
    exec grafana server "$@"
fi
exec grafana-server "$@"
