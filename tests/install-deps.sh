#!/bin/sh
# Installs the outside programs the whole-system tests start themselves, when
# missing (Debian packages; needs root, as CI and this project's machines run).
# The tests never skip: without these they fail and name this script.
set -eu

missing=""
need() { # need PROGRAM PACKAGE...
    program=$1
    shift
    command -v "$program" >/dev/null 2>&1 || missing="$missing $*"
}

need redis-server redis-server
need redis-cli redis-tools
need chromium chromium
need chromedriver chromium-driver
need docker-registry docker-registry
need skopeo skopeo
need containerd containerd

if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: the tests need:$missing; run as root: apt-get install -y$missing" >&2
    exit 1
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# shellcheck disable=SC2086 # one word per package
apt-get install -y -q $missing >/dev/null
