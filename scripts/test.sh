#!/usr/bin/env bash
# Set up .venv with the test extra if needed, then run the test suite (CPU only, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The report's browser tests drive Debian's headless Chromium (never a browser downloaded by a
# test tool); install it when missing and we may, otherwise those tests skip and say why.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing chromium and chromium-driver (apt-get)" >&2
        { apt-get update -q >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver \
              >/dev/null; } || echo "test: warning: could not install chromium; the browser tests will skip" >&2
    else
        echo "test: warning: /usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root;" \
             "the report's browser tests will skip (apt-get install chromium chromium-driver)" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"
