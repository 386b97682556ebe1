#!/usr/bin/env bash
# Build the project image from the repository's Dockerfile, with podman or docker.
#
#   scripts/build_image.sh                              # cyclegan-pipeline:VERSION
#   scripts/build_image.sh --tag REGISTRY/cyclegan-pipeline:0.1.0
#   scripts/build_image.sh --base local                 # on a Debian base made here, CPU torch
#   scripts/build_image.sh --base pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
#
# --base: the Dockerfile's BASE_IMAGE. "auto" (the default) is the Dockerfile's own CUDA
# PyTorch image when the engine has it or can pull it, and otherwise (no registry reachable)
# a base made on this machine by scripts/make_base.sh: Debian, Python, a CPU build of torch.
# "local" always makes (or reuses) that one.
#
# Environment: CONTAINER_ENGINE (podman or docker; default: the first installed),
# CONTAINERS_CONF (podman; default scripts/containers.conf), and make_base.sh's TORCH_WHEEL,
# DEBIAN_MIRROR. pip inside the build uses this machine's pip cert and index-url (podman).
#
# The image's name is the last line of stdout; the build's log goes to stderr. Unchanged
# inputs rebuild from the engine's layer cache in seconds. Exit status: 0 built, 1 the build
# failed (the failing step is named), 2 bad input or no usable engine.
set -euo pipefail
# shellcheck source=scripts/container_lib.sh
. "$(dirname "$0")/container_lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO_DIR/pyproject.toml" | head -n 1)"
tag="cyclegan-pipeline:${version:-latest}"
base=auto
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag | -t)
      [[ $# -ge 2 ]] || die "--tag needs a name (e.g. --tag REGISTRY/cyclegan-pipeline:$version)"
      tag="$2"
      shift 2
      ;;
    --tag=*) tag="${1#*=}" && shift ;;
    --base)
      [[ $# -ge 2 ]] || die "--base needs an image, 'local' or 'auto'"
      base="$2"
      shift 2
      ;;
    --base=*) base="${1#*=}" && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument '$1' (see $PROG --help)" ;;
  esac
done
[[ -n "$tag" && -n "$base" ]] || die "--tag and --base need a value"

select_engine

dockerfile="$REPO_DIR/Dockerfile"
default_base="$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$dockerfile" | head -n 1)"
[[ -n "$default_base" ]] || die "$dockerfile has no 'ARG BASE_IMAGE=...' line"

work="$(mktemp -d "${TMPDIR:-/tmp}/cyclegan-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- the base image -----------------------------------------------------------------------
pull() {
  "$ENGINE" pull --quiet "$1" >"$work/pull.log" 2>&1
}
case "$base" in
  local) base="$("$SCRIPTS_DIR/make_base.sh" | tail -n 1)" ;;
  auto)
    if image_exists "$default_base" || pull "$default_base"; then
      base="$default_base"
    else
      note "cannot pull $default_base ($(grep -v '^\s*$' "$work/pull.log" | tail -n 1 | cut -c1-160));" \
        "building on a local Debian base with a CPU torch instead"
      base="$("$SCRIPTS_DIR/make_base.sh" | tail -n 1)"
    fi
    ;;
  *)
    image_exists "$base" || pull "$base" || die "cannot pull $base:" \
      "$(grep -v '^\s*$' "$work/pull.log" | tail -n 1 | cut -c1-200) (check the name, or use --base local)"
    ;;
esac

# The Dockerfile installs with the base's `python` and `pip`: say so before a long build if
# they are not there, rather than in the middle of it.
probe='import importlib.util as u, sys
print("python %d.%d" % sys.version_info[:2])
print("pip", "yes" if u.find_spec("pip") else "no")
print("torch", "yes" if u.find_spec("torch") else "no")'
if ! found="$("$ENGINE" run --rm --network none --entrypoint python "$base" -c "$probe" 2>&1)"; then
  if grep -qi 'executable file.*not found' <<<"$found"; then
    why="no 'python' on PATH"
  else
    why="'python' fails: $(echo "$found" | grep -v '^\s*$' | tail -n 1 | cut -c1-160)"
  fi
  die "the base image $base has no usable Python ($why);" \
    "use an image with Python 3.11+, pip and PyTorch (the default $default_base) or --base local"
fi
py_minor="$(echo "$found" | sed -n 's/^python 3\.\([0-9]*\)$/\1/p')"
[[ -n "$py_minor" && "$py_minor" -ge 11 ]] \
  || die "the base image $base has $(echo "$found" | head -n 1), the project needs Python 3.11+"
grep -q '^pip yes' <<<"$found" || die "the base image $base has Python but no pip"
grep -q '^torch yes' <<<"$found" \
  || note "the base image $base has no torch: pip will install one from the index (a CUDA build, several GB)"

# --- the build ----------------------------------------------------------------------------
mapfile -t mounts < <(pip_build_mounts "$work")
log="${TMPDIR:-/tmp}/cyclegan-build-$(printf '%s' "$tag" | tr -c 'A-Za-z0-9._-' '_').log"
note "building $tag from $dockerfile on $base with $ENGINE (log: $log)"
started=$SECONDS
set +e
"$ENGINE" build --network host "${mounts[@]}" --build-arg "BASE_IMAGE=$base" \
  -t "$tag" -f "$dockerfile" "$REPO_DIR" 2>&1 | tee "$log" >&2
status=${PIPESTATUS[0]}
set -e
seconds=$((SECONDS - started))
if [[ "$status" != 0 ]]; then
  # podman: "STEP 7/16: RUN ..."; docker (BuildKit): "#9 [4/12] RUN ...".
  step="$(grep -E '^STEP [0-9]+/[0-9]+: |^#[0-9]+ \[[^]]*[0-9]+/[0-9]+\] ' "$log" | tail -n 1 \
    | sed -E 's/^#[0-9]+ //' | cut -c1-200)"
  # podman: "Error: building at STEP "...": while running runtime: exit status 1", just after
  # the command's own last words; docker: "ERROR: failed to solve: ...".
  why="$(grep -E '^(Error|ERROR)' "$log" | tail -n 1 | sed -E 's/^Error: building at STEP ".*": //' \
    | cut -c1-200)"
  said="$(grep -vE '^(Error|ERROR)|^\s*$' "$log" | tail -n 1 | sed -E 's/^\s+//' | cut -c1-200)"
  DIE_STATUS=1 die "the build of $tag failed at ${step:-an unknown step}" \
    "(${said:+$said; }${why:-exit status $status}); the whole log is in $log"
fi
size="$("$ENGINE" image inspect --format '{{.Size}}' "$tag")"
note "built $tag on $base in $seconds s; image size $((size / 1000000)) MB"
echo "$tag"
