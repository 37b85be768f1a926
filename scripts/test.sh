#!/usr/bin/env bash
# The whole test suite. Installs what the integration tests need when it is missing (Debian:
# mosquitto, nginx with its stream module, haproxy to check the example front configs, promtool
# (package prometheus) to check the alert rules), then runs `cargo test`. Extra arguments go to
# cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Kubernetes manifests are validated offline against the schemas this package ships (from
# PyPI). kubectl (for `kubectl kustomize`) comes with the machine; without it that one check
# is skipped, saying so.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing: kubernetes-validate (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >/dev/null 2>&1 \
    || echo "warning: kubernetes-validate could not be installed: schema validation is skipped"
  hash -r
fi
# The Debian packages install into /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

# A test run compiles once: incremental state would only add 600 MB to target/ (set
# CARGO_INCREMENTAL=1 to keep it while editing).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

exec cargo test "$@"
