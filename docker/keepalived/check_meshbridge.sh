#!/bin/sh
# keepalived vrrp_script: healthy while the bridge is ready (every link connected once or
# reporting why not). Replaces seed 004's process-watch loop.
# Usage: check_meshbridge.sh [ADMIN_ADDR]   (default 127.0.0.1:9183)
ADMIN="${1:-127.0.0.1:9183}"
exec curl -fsS --max-time 2 -o /dev/null "http://${ADMIN}/readyz"
