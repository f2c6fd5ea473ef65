#!/bin/sh
# install.sh: install the `ccgate` command for this user, on Linux or macOS. POSIX sh.
#
#   ./install.sh              install or update: from this clone, or from PyPI when the script is
#                             not inside a clone (`curl -fsSL <url>/install.sh | sh`)
#   ./install.sh --uninstall  remove exactly what earlier runs installed, and nothing else
#   ./install.sh --help       this text
#
# ccgate goes into an isolated environment, never into a system Python: `uv tool install` when uv
# is on PATH, else `pipx install` when pipx is, else a virtualenv of its own linked from
# ~/.local/bin. The bash, zsh and fish completions are installed too. Every file and folder the
# script creates is recorded in a manifest ($XDG_DATA_HOME/ccgate/install-manifest); --uninstall
# removes what it lists. A file that was already there is never overwritten nor removed, and
# ccgate's own data (ledger, config, keys) is not touched. Running it again is safe.
#
# Environment variables:
#   CCGATE_INSTALLER    venv, uv or pipx: force one (default: uv, else pipx, else venv)
#   CCGATE_PYTHON       the Python 3.11+ to use (default: the first of python3.13, python3.12,
#                       python3.11 and python3 that is 3.11 or newer)
#   CCGATE_INSTALL_DIR  the venv installer's virtualenv (default: $XDG_DATA_HOME/ccgate/venv)
#   CCGATE_BIN_DIR      where the `ccgate` command goes (default: ~/.local/bin)
#   CCGATE_PACKAGE      what to install: a folder, a wheel or a requirement such as ccgate==0.1.0
#                       (default: this clone, or ccgate from PyPI outside a clone)
#   XDG_DATA_HOME       default ~/.local/share; XDG_CONFIG_HOME default ~/.config
# pip, uv and pipx read their own settings as usual (PIP_INDEX_URL, PIP_FIND_LINKS, UV_INDEX...).
set -eu

# --- small helpers ------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

# Run a quiet, slow command (pip, uv, pipx) with a progress line every few seconds, so the
# 20-odd seconds of downloading and building never look like a hang. Its output goes to a log,
# shown only when it fails.
with_progress() { # message command...
    message=$1
    shift
    log=$(mktemp)
    "$@" >"$log" 2>&1 &
    pid=$!
    elapsed=0
    say "$message..."
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        elapsed=$((elapsed + 1))
        if [ $((elapsed % 5)) -eq 0 ] && kill -0 "$pid" 2>/dev/null; then
            say "  still working (${elapsed} s)"
        fi
    done
    if wait "$pid"; then
        rm -f -- "$log"
        say "  done (${elapsed} s)"
        return 0
    fi
    cat -- "$log" >&2
    rm -f -- "$log"
    die "$message failed (its output is above)."
}

# Where ccgate keeps its ledger, config and keys (what --uninstall leaves): platformdirs' folders,
# or CCGATE_HOME. Only those that exist, one per line.
data_folders() {
    if [ -n "${CCGATE_HOME:-}" ]; then
        set -- "$CCGATE_HOME"
    elif [ "$(uname -s)" = Darwin ]; then
        set -- "$HOME/Library/Application Support/ccgate"
    else
        set -- "${XDG_CONFIG_HOME:-$HOME/.config}/ccgate" "${XDG_DATA_HOME:-$HOME/.local/share}/ccgate" \
            "${XDG_STATE_HOME:-$HOME/.local/state}/ccgate"
    fi
    for folder in "$@"; do
        if [ -d "$folder" ]; then say "    $folder"; fi
    done
}

usage() {
    # The comment block at the top is the help: print it without the leading "# ".
    if [ -f "$1" ]; then
        sed -n '2,/^set -eu/p' "$1" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'
    else # piped into sh: the file is not at hand
        say "usage: install.sh [--uninstall | --help]; see the comment at the top of install.sh."
    fi
}

DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
MANIFEST=$DATA_HOME/ccgate/install-manifest
BIN_DIR=${CCGATE_BIN_DIR:-$HOME/.local/bin}
VENV_DIR=${CCGATE_INSTALL_DIR:-$DATA_HOME/ccgate/venv}

# The manifest: one "kind path" per line, in the order things were created; --uninstall undoes
# them in reverse, so files go before the folders that hold them.
record() {
    if [ ! -f "$MANIFEST" ] || ! grep -Fqx -- "$1 $2" "$MANIFEST"; then
        printf '%s %s\n' "$1" "$2" >>"$MANIFEST"
    fi
}

recorded() {
    [ -f "$MANIFEST" ] && grep -Fqx -- "$1 $2" "$MANIFEST"
}

# mkdir -p that records each folder it creates (outermost first), so --uninstall can remove the
# ones left empty and never a folder the user had.
make_dirs() {
    if [ -d "$1" ]; then return 0; fi
    make_dirs "$(dirname -- "$1")"
    mkdir -- "$1"
    record dir "$1"
}

# The manifest's own folder is made before the manifest exists, so record it afterwards.
start_manifest() {
    created=""
    dir=$(dirname -- "$MANIFEST")
    while [ ! -d "$dir" ]; do
        created="$dir
$created"
        dir=$(dirname -- "$dir")
    done
    mkdir -p -- "$(dirname -- "$MANIFEST")"
    if [ ! -f "$MANIFEST" ]; then
        printf '# Written by ccgate install.sh: what `install.sh --uninstall` removes.\n' >"$MANIFEST"
    fi
    printf '%s' "$created" | while IFS= read -r dir; do
        [ -n "$dir" ] && record dir "$dir"
    done
    return 0
}

# Copy a file into place unless a file we did not create is there already.
place_file() { # source target
    if [ -e "$2" ] && ! recorded file "$2"; then
        warn "left $2 alone: it was there before install.sh"
        return 0
    fi
    make_dirs "$(dirname -- "$2")"
    record file "$2"
    cp -- "$1" "$2.ccgate-tmp"
    mv -f -- "$2.ccgate-tmp" "$2"
}

# --- Python -------------------------------------------------------------------------------------

python_version() {
    "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

is_311_or_newer() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

find_python() {
    if [ -n "${CCGATE_PYTHON:-}" ]; then
        version=$(python_version "$CCGATE_PYTHON") || die "CCGATE_PYTHON=$CCGATE_PYTHON does not run."
        is_311_or_newer "$CCGATE_PYTHON" ||
            die "CCGATE_PYTHON=$CCGATE_PYTHON is Python $version; ccgate needs 3.11 or newer."
        PYTHON=$CCGATE_PYTHON
        return 0
    fi
    found=""
    for candidate in python3.13 python3.12 python3.11 python3; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        version=$(python_version "$path") || continue # e.g. a pyenv shim without that version
        if is_311_or_newer "$path"; then
            PYTHON=$path
            return 0
        fi
        found="$found${found:+, }$candidate ($version at $path)"
    done
    die "ccgate needs Python 3.11 or newer; found ${found:-no python3 on PATH}." \
        "Install Python 3.11+ (python.org, brew install python@3.12, apt install python3.12)" \
        "or point CCGATE_PYTHON at one."
}

# --- the installers -----------------------------------------------------------------------------

choose_installer() {
    case ${CCGATE_INSTALLER:-} in
        venv | uv | pipx) INSTALLER=$CCGATE_INSTALLER ;;
        "")
            if command -v uv >/dev/null 2>&1; then
                INSTALLER=uv
            elif command -v pipx >/dev/null 2>&1; then
                INSTALLER=pipx
            else
                INSTALLER=venv
            fi
            ;;
        *) die "CCGATE_INSTALLER must be venv, uv or pipx, not '$CCGATE_INSTALLER'." ;;
    esac
    if [ "$INSTALLER" != venv ] && ! command -v "$INSTALLER" >/dev/null 2>&1; then
        die "CCGATE_INSTALLER=$INSTALLER but $INSTALLER is not on PATH."
    fi
    previous=$(sed -n 's/^installer //p' "$MANIFEST" 2>/dev/null | head -n 1)
    if [ -n "$previous" ] && [ "$previous" != "$INSTALLER" ]; then
        die "ccgate was installed here with $previous; run './install.sh --uninstall' first to" \
            "switch to $INSTALLER."
    fi
}

install_venv() {
    if [ -e "$VENV_DIR" ] && ! recorded venv "$VENV_DIR"; then
        die "$VENV_DIR exists and was not created by install.sh; remove it or set" \
            "CCGATE_INSTALL_DIR to another folder."
    fi
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        make_dirs "$(dirname -- "$VENV_DIR")"
        record venv "$VENV_DIR"
        say "Creating a virtualenv in $VENV_DIR with $PYTHON"
        if ! "$PYTHON" -m venv "$VENV_DIR"; then
            rm -rf -- "$VENV_DIR"
            die "$PYTHON could not create a virtualenv; on Debian or Ubuntu install the" \
                "python3-venv package for it (e.g. apt install python3.12-venv)."
        fi
    fi
    with_progress "Installing $PACKAGE and its dependencies with pip (about 20 s)" \
        "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$PACKAGE"
    make_dirs "$BIN_DIR"
    record file "$BIN_DIR/ccgate"
    ln -sf -- "$VENV_DIR/bin/ccgate" "$BIN_DIR/ccgate"
}

install_uv() {
    # A tool uv already had before install.sh is the user's: update it, but never remove it.
    make_dirs "$BIN_DIR" # before the tool, so --uninstall removes the tool first
    if ! recorded tool uv && ! uv tool list 2>/dev/null | grep -q '^ccgate '; then
        record tool uv
    fi
    with_progress "Installing $PACKAGE with uv" \
        env UV_TOOL_BIN_DIR="$BIN_DIR" uv tool install --quiet --reinstall --python "$PYTHON" "$PACKAGE"
}

install_pipx() {
    make_dirs "$BIN_DIR"
    if ! recorded tool pipx && ! pipx list --short 2>/dev/null | grep -q '^ccgate '; then
        record tool pipx
    fi
    with_progress "Installing $PACKAGE with pipx" \
        env PIPX_BIN_DIR="$BIN_DIR" pipx install --force --python "$PYTHON" "$PACKAGE"
}

# --- completions --------------------------------------------------------------------------------

# Outside a clone there are no committed completions: ask the installed ccgate for Typer's
# scripts and apply the same zsh fixes as scripts/gen-completions (#compdef on line 1, complete
# on the first TAB when autoloaded).
generate_completions() { # dir
    for shell in bash zsh fish; do
        _CCGATE_COMPLETE=source_$shell "$BIN_DIR/ccgate" 2>/dev/null | sed '/./,$!d' >"$1/$shell"
    done
    awk '
        $0 == "compdef _ccgate_completion ccgate" {
            print "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then"
            print "  _ccgate_completion \"$@\""
            print "else"
            print "  compdef _ccgate_completion ccgate"
            print "fi"
            next
        }
        { print }
    ' "$1/zsh" >"$1/zsh.fixed"
    mv -f -- "$1/zsh.fixed" "$1/zsh"
}

install_completions() {
    if [ -n "$CLONE" ] && [ -f "$CLONE/completions/ccgate.bash" ]; then
        bash_src=$CLONE/completions/ccgate.bash
        zsh_src=$CLONE/completions/_ccgate
        fish_src=$CLONE/completions/ccgate.fish
    else
        TMP_DIR=$(mktemp -d)
        trap 'rm -rf -- "$TMP_DIR"' EXIT
        generate_completions "$TMP_DIR"
        bash_src=$TMP_DIR/bash
        zsh_src=$TMP_DIR/zsh
        fish_src=$TMP_DIR/fish
    fi
    place_file "$bash_src" "$DATA_HOME/bash-completion/completions/ccgate"
    place_file "$zsh_src" "$DATA_HOME/zsh/site-functions/_ccgate"
    place_file "$fish_src" "$CONFIG_HOME/fish/completions/ccgate.fish"
}

# --- install and uninstall ----------------------------------------------------------------------

find_clone() {
    CLONE=""
    # Piped into sh, $0 is the shell, not this file: then there is no clone.
    case $0 in
        *install.sh) ;;
        *) return 0 ;;
    esac
    [ -f "$0" ] || return 0
    dir=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
    if [ -f "$dir/pyproject.toml" ] && [ -f "$dir/src/ccgate/__init__.py" ]; then
        CLONE=$dir
    fi
}

# A path as the user would type it in a profile: $HOME/... rather than /home/name/...
home_relative() {
    case $1 in
        "$HOME"/*) printf '$HOME/%s' "${1#"$HOME"/}" ;;
        *) printf '%s' "$1" ;;
    esac
}

show_hints() {
    case ":$PATH:" in
        *":$BIN_DIR:"*) ;;
        *)
            say ""
            say "$BIN_DIR is not on your PATH. Add this line to ~/.profile, ~/.bashrc or ~/.zshrc:"
            say "    export PATH=\"$(home_relative "$BIN_DIR"):\$PATH\""
            say "(fish: fish_add_path $(home_relative "$BIN_DIR"))"
            ;;
    esac
    say ""
    say "Completions: bash loads them through the bash-completion package; fish loads them by"
    say "itself; for zsh, add this line to ~/.zshrc before compinit runs:"
    say "    fpath=(\"$(home_relative "$DATA_HOME/zsh/site-functions")\" \$fpath)"
}

do_install() {
    find_clone
    PACKAGE=${CCGATE_PACKAGE:-${CLONE:-ccgate}}
    find_python
    choose_installer
    # Refuse before writing anything: a failed first run leaves no trace.
    if [ -e "$BIN_DIR/ccgate" ] || [ -L "$BIN_DIR/ccgate" ]; then
        if ! recorded file "$BIN_DIR/ccgate" && ! recorded tool "$INSTALLER"; then
            die "$BIN_DIR/ccgate already exists and was not installed by install.sh; remove it" \
                "(or uninstall it the way it was installed), or set CCGATE_BIN_DIR."
        fi
    fi
    start_manifest
    record installer "$INSTALLER"
    "install_$INSTALLER"
    version=$("$BIN_DIR/ccgate" --version) || die "the installed $BIN_DIR/ccgate does not run."
    say "Installing shell completions"
    install_completions
    say "Installed $version: $BIN_DIR/ccgate (with $INSTALLER)."
    show_hints
    say ""
    say "Next: ccgate up    (\`install.sh --uninstall\` removes all of it again)"
}

undo() { # kind path
    case $1 in
        file) rm -f -- "$2" ;;
        dir) rmdir -- "$2" 2>/dev/null || true ;; # only when empty: never the user's files
        venv)
            if [ -f "$2/pyvenv.cfg" ]; then rm -rf -- "$2"; fi
            ;;
        tool)
            case $2 in
                uv) uv tool uninstall ccgate >/dev/null 2>&1 || warn "uv tool uninstall ccgate failed" ;;
                pipx) pipx uninstall ccgate >/dev/null 2>&1 || warn "pipx uninstall ccgate failed" ;;
            esac
            ;;
        installer | "#"*) ;;
        *) warn "ignored an unknown manifest line: $1 $2" ;;
    esac
}

do_uninstall() {
    if [ ! -f "$MANIFEST" ]; then
        say "Nothing to uninstall: no $MANIFEST."
        return 0
    fi
    # A daemon left running from files about to go would keep Claude Code pointed at it.
    if grep -q '^installer ' "$MANIFEST" && [ -x "$BIN_DIR/ccgate" ]; then
        say "Stopping ccgate if it runs (ccgate down):"
        "$BIN_DIR/ccgate" down || warn "\`ccgate down\` failed; stop the daemon yourself."
    fi
    # Read it whole and newest first, then delete it, so its folder can go too.
    entries=$(sed '1!G;h;$!d' "$MANIFEST")
    rm -f -- "$MANIFEST"
    printf '%s\n' "$entries" | while IFS= read -r line; do
        [ -n "$line" ] && undo "${line%% *}" "${line#* }"
    done
    kept=$(data_folders)
    if [ -n "$kept" ]; then
        say "Removed ccgate and everything install.sh had installed. Your ccgate data (ledger," \
            "config, keys) is kept in:"
        say "$kept"
        say "Delete those folders to remove it too (the keys in the OS keyring stay until you" \
            "delete the 'ccgate' entries)."
    else
        say "Removed ccgate and everything install.sh had installed. There was no ccgate data" \
            "to keep."
    fi
}

case ${1:-} in
    "") do_install ;;
    --uninstall) do_uninstall ;;
    -h | --help) usage "$0" ;;
    *) die "unknown argument '$1'; see --help." ;;
esac
