#!/usr/bin/env bash
# Debian's Chromium for the review page's browser test (never a downloaded browser). Installs it when
# it is missing and this user may (root); otherwise says how, and the test then reports it missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the review page's browser test (apt-get install chromium)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "chromium is missing and this user cannot install it: run 'sudo apt-get install chromium';" \
        "tests/test_review_browser.py is skipped (with this reason) until then" >&2
fi
