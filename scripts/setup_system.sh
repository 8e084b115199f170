#!/usr/bin/env bash
# Debian packages the test suite needs (CI runs as root on a fresh machine).
# Idempotent: installs only what is missing; a no-op when everything is there.
set -euo pipefail
packages=(
  nftables   # tests/netns.py: drop a test host's packets (this kernel has no netem)
  openssl    # tests/gateway/test_answer_sizes.py: a throw-away certificate for the HTTPS upstream
  chromium          # tests/e2e/test_console.py: the web console in a real headless browser
  chromium-driver   # (driven by selenium; about 15 s of apt-get on a fresh machine)
  espeak-ng  # tests/e2e/test_kinds.py: speech synthesized offline for the transcription test
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_system: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "setup_system: apt-get install ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
