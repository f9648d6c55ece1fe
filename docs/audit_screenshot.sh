#!/usr/bin/env bash
# Renders an audit report (OUT/index.html of `peel-jax audit`) in headless Chromium, as a person's browser shows it,
# and writes docs/audit.png. Not run in CI. Needs Debian's chromium package (apt-get install -y chromium).
#
#   docs/audit_screenshot.sh [OUT] [WIDTHxHEIGHT]     # defaults: audit_out, 1280x2000
set -euo pipefail
out="${1:-audit_out}"
size="${2:-1280x2000}"
docs="$(cd "$(dirname "$0")" && pwd)"
if [ ! -f "$out/index.html" ]; then
  echo "audit_screenshot.sh: no $out/index.html; run peel-jax audit --out $out first" >&2
  exit 2
fi
page="$(cd "$out" && pwd)/index.html"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "audit_screenshot.sh: chromium not found (apt-get install -y chromium)" >&2
  exit 2
fi
# --no-sandbox: Chromium refuses to run as root otherwise (containers); the page is our own local file.
# No network is needed or used: the report embeds every figure and loads nothing.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size="${size/x/,}" --screenshot="$docs/audit.png" "file://$page" 2>/dev/null
echo "wrote $docs/audit.png from $page"
