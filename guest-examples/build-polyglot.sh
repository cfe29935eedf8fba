#!/usr/bin/env bash
# Builds the Python and JavaScript guest examples into agent components:
#
#   guest-examples/build-polyglot.sh OUT_DIR [python] [js]
#   guest-examples/build-polyglot.sh --tools-only [python] [js]
#
# writes OUT_DIR/python_agent.wasm (componentize-py) and OUT_DIR/js_agent.wasm
# (componentize-js), both against wit/agent.wit, world `supervised-agent`.
# Without a language argument it builds both. `--tools-only` installs the
# tools and builds nothing (CI times the install with it).
#
# The tools are pinned and installed on first use:
#   - componentize-py (PyPI) into a venv under $TERRAPHIM_POLYGLOT_TOOLS
#     (default ~/.cache/terraphim-polyglot); needs python3 with venv and pip;
#   - @bytecodealliance/componentize-js (npm) into js-agent/node_modules by
#     `npm ci` from js-agent/package-lock.json; needs node >= 20 and npm.
# A component whose inputs (sources, WIT, tool pins, this script) did not
# change since it was built is not rebuilt: a stamp next to it holds their
# hash.
#
# Exit status: 0 built or up to date; 1 a build failed; 2 usage;
# 3 a tool is missing or cannot be installed (the message says which and how
# to get it). The tests (host/tests/polyglot.rs) skip a language on 3.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1
# Also pinned (exactly) in js-agent/package.json and its package-lock.json.
COMPONENTIZE_JS_VERSION=0.23.0
EXIT_TOOL_MISSING=3

usage() {
    echo "usage: $0 OUT_DIR [python] [js]" >&2
    echo "       $0 --tools-only [python] [js]" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script="$here/$(basename "${BASH_SOURCE[0]}")"
repo=$(dirname "$here")
wit="$repo/wit"
tools="${TERRAPHIM_POLYGLOT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/terraphim-polyglot}"

[ $# -ge 1 ] || usage
tools_only=false
out=
if [ "$1" = --tools-only ]; then
    tools_only=true
else
    mkdir -p "$1"
    out=$(cd "$1" && pwd)
fi
shift
languages=("$@")
[ ${#languages[@]} -gt 0 ] || languages=(python js)

say() { echo "build-polyglot: $*" >&2; }

# A tool is missing: say so and how to get it, exit 3.
missing() {
    say "cannot build the $1 agent: $2"
    exit "$EXIT_TOOL_MISSING"
}

failed() {
    say "building the $1 agent failed: $2"
    exit 1
}

# The hash of the given text and files (plus the WIT and this script).
fingerprint() {
    local text=$1
    shift
    {
        echo "$text"
        sha256sum "$@" "$script" "$wit"/*.wit
    } | sha256sum | cut -d' ' -f1
}

up_to_date() { # WASM STAMP
    [ -s "$1" ] && [ "$(cat "$1.stamp" 2>/dev/null)" = "$2" ]
}

# Serialise concurrent builds into one OUT_DIR (fd 9) and installs into
# one tools directory (fd 8); held until the language's subshell ends.
lock() { # FD FILE
    if command -v flock >/dev/null; then
        eval "exec $1>\"\$2\""
        flock "$1"
    fi
}

venv="$tools/componentize-py-$COMPONENTIZE_PY_VERSION"

install_python() {
    local tool="$venv/bin/componentize-py"
    mkdir -p "$tools"
    lock 8 "$tools/.install-python.lock"
    if [ "$("$tool" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
        command -v python3 >/dev/null ||
            missing python "python3 is not installed (Debian: apt-get install python3 python3-venv)"
        say "installing componentize-py==$COMPONENTIZE_PY_VERSION into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" >&2 ||
            missing python "\`python3 -m venv\` failed (Debian: apt-get install python3-venv)"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 2 --timeout 30 \
            "componentize-py==$COMPONENTIZE_PY_VERSION" >&2 ||
            missing python "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION (is PyPI reachable?)"
    fi
}

build_python() {
    local src="$here/python-agent" wasm="$out/python_agent.wasm" stamp
    stamp=$(fingerprint "componentize-py==$COMPONENTIZE_PY_VERSION" "$src/app.py")
    if up_to_date "$wasm" "$stamp"; then
        say "$wasm is up to date"
        return
    fi
    install_python
    local tool="$venv/bin/componentize-py"
    say "componentize-py: $src/app.py -> $wasm"
    # Built from a copy: componentize-py leaves a __pycache__ next to the
    # app. -p: the app's directory; the tool adds its own venv's
    # site-packages (not those of a VIRTUAL_ENV of the caller's).
    local stage="$out/python-agent.src"
    rm -rf "$stage"
    mkdir -p "$stage"
    cp "$src/app.py" "$stage/"
    (cd "$stage" && env -u VIRTUAL_ENV \
        "$tool" -d "$wit" -w supervised-agent componentize app -p "$stage" -o "$wasm.tmp") >&2 ||
        failed python "componentize-py exited with an error (see above)"
    rm -rf "$stage"
    mv "$wasm.tmp" "$wasm"
    echo "$stamp" >"$wasm.stamp"
}

install_js() {
    local src="$here/js-agent"
    mkdir -p "$tools"
    lock 8 "$tools/.install-js.lock"
    command -v node >/dev/null ||
        missing js "node is not installed (node >= 20 with npm: https://nodejs.org or Debian: apt-get install nodejs npm)"
    command -v npm >/dev/null ||
        missing js "npm is not installed (Debian: apt-get install npm)"
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    [ "$major" -ge 20 ] ||
        missing js "node $(node --version) is too old: componentize-js $COMPONENTIZE_JS_VERSION needs node >= 20"
    # `npm ci` wipes and reinstalls node_modules: only when the lockfile changed.
    local installed="$src/node_modules/.terraphim-lock-hash" lock_hash
    lock_hash=$(sha256sum <"$src/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$installed" 2>/dev/null)" != "$lock_hash" ]; then
        say "npm ci in $src (@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION)"
        (cd "$src" && npm ci --no-audit --no-fund --fetch-retries=2) >&2 ||
            missing js "\`npm ci\` failed in $src (is the npm registry reachable?)"
        echo "$lock_hash" >"$installed"
    fi
}

build_js() {
    local src="$here/js-agent" wasm="$out/js_agent.wasm" stamp
    stamp=$(fingerprint "componentize-js@$COMPONENTIZE_JS_VERSION" \
        "$src/agent.js" "$src/build.mjs" "$src/package.json" "$src/package-lock.json")
    if up_to_date "$wasm" "$stamp"; then
        say "$wasm is up to date"
        return
    fi
    install_js
    say "componentize-js: $src/agent.js -> $wasm"
    node "$src/build.mjs" "$wasm.tmp" >&2 ||
        failed js "componentize-js exited with an error (see above)"
    mv "$wasm.tmp" "$wasm"
    echo "$stamp" >"$wasm.stamp"
}

for language in "${languages[@]}"; do
    case "$language" in
    python | js)
        (
            if $tools_only; then
                "install_$language"
            else
                lock 9 "$out/.$language.lock"
                "build_$language"
            fi
        )
        ;;
    *) usage ;;
    esac
done
