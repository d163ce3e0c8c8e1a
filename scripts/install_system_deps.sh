#!/usr/bin/env bash
# The Debian tools the tests drive for real, installed with apt-get when missing and root
# (run by `make test` and so by .ci/run):
#   prometheus (with promtool)  a real Prometheus scrapes a real server (tests/deploy)
#   chromium, chromium-driver   /dashboard in a headless browser (tests/deploy/test_status_page.py)
# Not root, or no apt-get: a warning, and those tests skip saying why.
set -euo pipefail
missing=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: ${missing[*]} missing and cannot apt-get install them (not root): their tests will be skipped" >&2
fi
