#!/usr/bin/env bash
# Puts `nvmirror` on the PATH for this checkout (run by `npm start` before it serves):
# `npm link` makes a global symlink to bin/nvmirror. Where the global prefix is not
# writable (no root, no user prefix), it says in one line how to use the command instead.
# Never fails the caller: the server starts either way.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
here="$(pwd)"
if [ "$(command -v nvmirror 2>/dev/null)" != "" ] && [ "$(readlink -f "$(command -v nvmirror)")" = "$(readlink -f "$here/bin/nvmirror")" ]; then
  exit 0
fi
if npm link --no-audit --no-fund --ignore-scripts >/dev/null 2>&1 && command -v nvmirror >/dev/null 2>&1; then
  echo "nvmirror: linked $(command -v nvmirror) -> $here/bin/nvmirror"
else
  echo "nvmirror: could not put nvmirror on the PATH (npm link needs a writable global prefix); use $here/bin/nvmirror or: export PATH=\"$here/bin:\$PATH\""
fi
exit 0
