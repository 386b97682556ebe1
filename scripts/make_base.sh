#!/usr/bin/env bash
# A base image for the project image on a machine that reaches no image registry (the
# project's CI): Debian from Debian's own packages (debootstrap, minbase), Python in a venv at
# /opt/venv first on PATH (where pytorch/pytorch has its conda Python), and a CPU build of
# torch with the matching torchvision. Prints the image's name as its last line.
#
#   scripts/make_base.sh                      # -> localhost/cyclegan-base:<hash>
#   TORCH_WHEEL=/path/to/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl scripts/make_base.sh
#
# The torch wheel is $TORCH_WHEEL, else the newest CPU wheel in pip's find-links folders; its
# Python tag picks the Debian release (cp311: bookworm, cp313: trixie). The tag is a hash of
# everything that goes in (this script, the wheel, the torchvision version), so an unchanged
# base is found and not made again. Needs root (debootstrap) and network access to a Debian
# mirror ($DEBIAN_MIRROR) and to the package index.
set -euo pipefail
# shellcheck source=scripts/container_lib.sh
. "$(dirname "$0")/container_lib.sh"

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REBUILD="${REBUILD_BASE:-0}"

select_engine

# --- the torch wheel ----------------------------------------------------------------------
arch="$(uname -m)"
wheel="${TORCH_WHEEL:-}"
if [[ -z "$wheel" ]]; then
  for dir in $(pip_setting find-links); do
    dir="${dir#file://}"
    [[ -d "$dir" ]] || continue
    for f in "$dir"/torch-*+cpu-cp3*-linux*_"$arch".whl "$dir"/torch-*+cpu-cp3*-manylinux*_"$arch".whl; do
      [[ -f "$f" ]] && echo "$f"
    done
  done >"${TMPDIR:-/tmp}/cyclegan-wheels.$$"
  wheel="$(sort -uV "${TMPDIR:-/tmp}/cyclegan-wheels.$$" | tail -n 1)"
  rm -f "${TMPDIR:-/tmp}/cyclegan-wheels.$$"
  [[ -n "$wheel" ]] || die "no CPU torch wheel for $arch in pip's find-links" \
    "($(pip_setting find-links | tr -d '\n' || true)); set TORCH_WHEEL=/path/to/torch-VERSION+cpu-cp311-...whl"
fi
[[ -f "$wheel" ]] || die "TORCH_WHEEL=$wheel does not exist"
wheel_name="$(basename "$wheel")"
torch_version="$(echo "$wheel_name" | cut -d- -f2)"       # 2.13.0+cpu
python_tag="$(echo "$wheel_name" | cut -d- -f3)"          # cp311
case "$python_tag" in
  cp311) suite=bookworm ;;
  cp313) suite=trixie ;;
  *) die "$wheel_name is for $python_tag; a Debian base has Python 3.11 (bookworm) or 3.13 (trixie)" ;;
esac
# torchvision 0.N pairs with torch 2.(N-15): 0.28.x with 2.13.x.
release="${torch_version%%+*}"
IFS=. read -r t_major t_minor t_patch <<<"$release"
[[ "$t_major" == 2 ]] || die "$wheel_name: only torch 2.x is supported (set TORCHVISION_SPEC)"
torchvision_spec="${TORCHVISION_SPEC:-torchvision==0.$((t_minor + 15)).${t_patch:-0}}"

# --- already made? ------------------------------------------------------------------------
hash="$(
  {
    sha256sum "$0" | cut -d' ' -f1
    sha256sum "$wheel" | cut -d' ' -f1
    echo "$suite $torchvision_spec"
  } | sha256sum | cut -c1-12
)"
tag="localhost/cyclegan-base:$hash"
if [[ "$REBUILD" != 1 ]] && image_exists "$tag"; then
  note "$tag is up to date (torch $torch_version, Debian $suite)"
  echo "$tag"
  exit 0
fi

[[ "$(id -u)" == 0 ]] || die "making a base needs root (debootstrap); run as root, or build on" \
  "an image that has Python and PyTorch (scripts/build_image.sh --base IMAGE)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"

work="$(mktemp -d "${TMPDIR:-/var/tmp}/cyclegan-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# --- Debian -------------------------------------------------------------------------------
note "debootstrap $suite (minbase + python3) from $MIRROR"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
  tail -n 15 "$work/debootstrap.log" >&2
  die "debootstrap of Debian $suite from $MIRROR failed (its log is above); set DEBIAN_MIRROR" \
    "to a reachable mirror"
fi
# Package caches and lists are of no use in an image that installs nothing with apt.
rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/*
# An empty pip configuration: builds mount this machine's pip settings over it (see
# pip_build_mounts), and a file that is already there leaves no trace in the image.
: >"$work/rootfs/etc/pip.conf"
debian_tag="localhost/cyclegan-debian:$hash"
tar -C "$work/rootfs" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$debian_tag" \
  >"$work/import.log" 2>&1 || {
  tail -n 5 "$work/import.log" >&2
  die "$ENGINE import of the Debian root failed (the log is above)"
}
rm -rf "$work/rootfs"
note "Debian $suite imported as $debian_tag ($((SECONDS - started)) s)"

# --- Python, torch, torchvision -----------------------------------------------------------
# The wheel is bind-mounted for the one step that installs it, so the base has torch
# installed but not the 200 MB file it came from.
mkdir -p "$work/context/wheels"
ln "$wheel" "$work/context/wheels/$wheel_name" 2>/dev/null || cp "$wheel" "$work/context/wheels/"
cat >"$work/context/Containerfile" <<EOF
FROM $debian_tag
ENV VIRTUAL_ENV=/opt/venv \\
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \\
    python3 -m venv /opt/venv \\
    && pip install --no-cache-dir --disable-pip-version-check /tmp/wheels/$wheel_name \\
    && pip install --no-cache-dir --disable-pip-version-check --no-deps "$torchvision_spec" \\
    && python -c "import torch; print('torch', torch.__version__)"
LABEL org.opencontainers.image.description="Debian $suite, Python venv /opt/venv, torch $torch_version ($torchvision_spec); made by scripts/make_base.sh"
CMD ["/bin/bash"]
EOF
mapfile -t mounts < <(pip_build_mounts "$work")
net=()
is_podman && net=(--network host)
note "installing $wheel_name and $torchvision_spec into /opt/venv"
if ! "$ENGINE" build "${net[@]}" "${mounts[@]}" -t "$tag" "$work/context" >"$work/build.log" 2>&1; then
  tail -n 20 "$work/build.log" >&2
  die "installing torch into the base failed (the build's log is above)"
fi
note "made $tag in $((SECONDS - started)) s (Debian $suite, torch $torch_version)"
echo "$tag"
