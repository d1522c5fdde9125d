#!/usr/bin/env bash
# Debian packages the project uses, installed only when running as root and only if missing:
#  - libjpeg/zlib/libwebp/libpng headers + a compiler: to build pillow-simd;
#  - slurm-wlm + munge: the one-node local SLURM used by the launcher tests (slurm/local-cluster);
#  - dataset-fashion-mnist: labelled data for seer-eval and the demo.
# Skip with SEER_NO_APT=1 (e.g. on a cluster login node, where none of this is wanted).
set -uo pipefail
PKGS="build-essential libjpeg-dev zlib1g-dev libwebp-dev libpng-dev slurm-wlm munge dataset-fashion-mnist"
if [ "${SEER_NO_APT:-0}" = "1" ]; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[install] not root or no apt-get: skipping system packages ($PKGS)"; exit 0
fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "[install] apt-get install:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "[install] apt-get update failed; trying the cached lists"
apt-get install -y -qq --no-install-recommends $missing >/dev/null || {
  echo "[install] apt-get could not install:$missing (continuing; dependent tests will say what is missing)"; }
