#!/usr/bin/env bash
# The same as scripts/fuzz: scripts/fuzz.sh [SECONDS].
exec "$(dirname "$0")/fuzz" "$@"
