# Shared by scripts/build_image.sh and scripts/make_base.sh (sourced, not run): the container
# engine, the project's podman settings, and how pip inside a build reaches the index.
# shellcheck shell=bash

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_DIR="$(cd "$SCRIPTS_DIR/.." && pwd)"
PROG="$(basename "$0")"

die() {
  # One line naming the problem and the fix, on stderr; exit status 2 for bad input or set-up.
  echo "$PROG: error: $*" >&2
  exit "${DIE_STATUS:-2}"
}

note() {
  echo "$PROG: $*" >&2
}

# select_engine: sets ENGINE to podman or docker ($CONTAINER_ENGINE, else the first installed).
select_engine() {
  ENGINE="${CONTAINER_ENGINE:-}"
  if [[ -z "$ENGINE" ]]; then
    if command -v podman >/dev/null 2>&1; then
      ENGINE=podman
    elif command -v docker >/dev/null 2>&1; then
      ENGINE=docker
    else
      die "no container engine: neither podman nor docker is installed" \
        "(install one: apt-get install podman runc; or set CONTAINER_ENGINE)"
    fi
  fi
  case "$(basename "$ENGINE")" in
    podman | docker) ;;
    *) die "CONTAINER_ENGINE=$ENGINE: expected podman or docker" ;;
  esac
  command -v "$ENGINE" >/dev/null 2>&1 || die "CONTAINER_ENGINE=$ENGINE is not installed"
  if [[ "$(basename "$ENGINE")" == podman ]]; then
    # The project's settings (runc, cgroupfs), unless the caller chose a configuration.
    if [[ -z "${CONTAINERS_CONF:-}" ]]; then
      export CONTAINERS_CONF="$SCRIPTS_DIR/containers.conf"
      command -v runc >/dev/null 2>&1 \
        || die "podman with $CONTAINERS_CONF needs runc (apt-get install runc)," \
          "or set CONTAINERS_CONF to a configuration of your own"
    fi
  fi
  "$ENGINE" info >/dev/null 2>"${TMPDIR:-/tmp}/cyclegan-engine-info.$$" || {
    local why
    why="$(grep -v '^\s*$' "${TMPDIR:-/tmp}/cyclegan-engine-info.$$" | tail -n 1)"
    rm -f "${TMPDIR:-/tmp}/cyclegan-engine-info.$$"
    die "$ENGINE cannot run here: ${why:-$ENGINE info failed} (start its daemon or service," \
      "or try the other engine with CONTAINER_ENGINE)"
  }
  rm -f "${TMPDIR:-/tmp}/cyclegan-engine-info.$$"
}

is_podman() {
  [[ "$(basename "$ENGINE")" == podman ]]
}

image_exists() {
  "$ENGINE" image inspect "$1" >/dev/null 2>&1
}

# pip_setting NAME: the value of pip's NAME setting on this machine ($PIP_NAME, else pip's
# configuration files), or nothing.
pip_setting() {
  local name="$1" env_name value
  env_name="PIP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  value="${!env_name:-}"
  if [[ -z "$value" ]]; then
    value="$("${PYTHON:-python3}" -m pip config list 2>/dev/null \
      | sed -n "s/^[^=]*\.$name='\(.*\)'$/\1/p" | tail -n 1)"
  fi
  printf '%s' "$value"
}

# pip_build_mounts DIR: print podman build arguments that let pip inside the build reach the
# index the way pip on this machine does: the CA bundle pip trusts here (a machine behind a
# TLS-inspecting proxy has the proxy's CA in it) and an http(s) index-url. They are bind
# mounts over /etc/pip.conf and the system CA bundle, present only while a step runs; a base
# that lacks those files keeps an empty placeholder of each (podman makes mount points).
BUILD_CA=/etc/ssl/certs/ca-certificates.crt
pip_build_mounts() {
  local dir="$1" cert index
  cert="$(pip_setting cert)"
  index="$(pip_setting index-url)"
  [[ -n "$cert" || "$index" == http* ]] || return 0
  is_podman || {
    note "pip's cert/index-url settings are not passed into a docker build (podman only)"
    return 0
  }
  {
    echo "[global]"
    if [[ -n "$cert" ]]; then
      [[ -f "$cert" ]] || die "pip's cert setting names $cert, which does not exist"
      echo "cert = $BUILD_CA"
    fi
    [[ "$index" == http* ]] && echo "index-url = $index"
  } >"$dir/pip.conf"
  printf '%s\n' "--volume=$dir/pip.conf:/etc/pip.conf:ro"
  [[ -n "$cert" ]] && printf '%s\n' "--volume=$(readlink -f "$cert"):$BUILD_CA:ro"
  return 0
}
