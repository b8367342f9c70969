#!/usr/bin/env bash
# `make images`: the CPU images of the operator, the builder and the server, built with no
# Docker engine and no registry: a Debian base made by mmdebstrap from the sources apt uses
# here, imported with podman, then `buildah bud --isolation chroot --pull=never` per Dockerfile.
# podman's storage and config live in $IMAGES_DIR (default build/images), never system-wide.
#
#   scripts/build_images.sh                      build all three (local tags only)
#   IMAGES="serving" scripts/build_images.sh     build some
#   REGISTRY=ghcr.io/me scripts/build_images.sh  also tag <REGISTRY>/<name>:<version> and push
#   scripts/build_images.sh --env                print the exports that point podman at the store
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGES_DIR=${IMAGES_DIR:-$ROOT/build/images}
IMAGES=${IMAGES:-operator builder serving}
REGISTRY=${REGISTRY:-}
SUITE=bookworm
# the base's recipe; its hash names the cached tarball and the base tag, so a changed recipe
# makes a new base (and new images) instead of reusing a stale one
BASE_RECIPE=(--variant=minbase --include=python3,python3-venv,ca-certificates
    # merged /usr made by mmdebstrap itself: the usrmerge package would pull in perl (~50 MB)
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    # docs, man pages and translations are no use in a container (~45 MB)
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*')
BASE_ID=$(printf '%s\n' "$SUITE" "${BASE_RECIPE[@]}" | sha256sum | cut -c1-12)
BASE_TAG=localhost/optimodel/base-$SUITE:$BASE_ID
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null || true)" ]]; then REVISION="$REVISION-dirty"; fi
# the host's CA bundle: pip inside a build step verifies TLS with it (mounted read-only, never copied)
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
# iptables: podman's CNI portmap plugin publishes ports with it (only a Suggests of podman)
PACKAGES=(podman buildah skopeo runc mmdebstrap iptables)

export CONTAINERS_CONF="$IMAGES_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$IMAGES_DIR/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$IMAGES_DIR/registries.conf"
export TMPDIR="$IMAGES_DIR/tmp"

if [[ "${1:-}" == "--env" ]]; then
    for v in CONTAINERS_CONF CONTAINERS_STORAGE_CONF CONTAINERS_REGISTRIES_CONF; do echo "export $v=${!v}"; done
    exit 0
fi

log() { printf '[images] %s\n' "$*" >&2; }

install_tools() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    local apt=(apt-get -o DPkg::Lock::Timeout=600)
    [[ $(id -u) -eq 0 ]] || apt=(sudo "${apt[@]}")
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" \
        || { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; }
}

write_config() {
    mkdir -p "$IMAGES_DIR/storage" "$IMAGES_DIR/run" "$TMPDIR"
    # runc: crun fails on this kind of host (cgroups v1 / hybrid); ulimits: podman's defaults
    # ask for the hard limits, which a nested container may not raise
    cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat > "$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$IMAGES_DIR/storage"
runroot = "$IMAGES_DIR/run"
EOF
    # short names never resolve to a registry: every FROM here is a local image
    printf 'unqualified-search-registries = []\n' > "$CONTAINERS_REGISTRIES_CONF"
}

# The Debian sources apt uses on this host (deb822 .sources or one-line .list files).
apt_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -s "$f" ]] || continue
        grep -Eqs "^(deb |Types:.*deb)" "$f" && grep -Eqs "(^|[[:space:]])$SUITE([[:space:]]|$)" "$f" && echo "$f"
    done
}

build_base() {
    local tarball="$IMAGES_DIR/base-$SUITE-$BASE_ID.tar" t0=$SECONDS
    if [[ ! -s "$tarball" ]]; then
        mapfile -t sources < <(apt_sources)
        [[ ${#sources[@]} -gt 0 ]] || { log "no apt source for $SUITE in /etc/apt"; exit 1; }
        log "base: mmdebstrap $SUITE from ${sources[*]}"
        mmdebstrap "${BASE_RECIPE[@]}" --format=tar "$SUITE" "$tarball.part" "${sources[@]}" >&2
        mv "$tarball.part" "$tarball"
    fi
    if ! podman image exists "$BASE_TAG"; then
        podman import --quiet "$tarball" "$BASE_TAG" >/dev/null
        # tarballs of older recipes
        find "$IMAGES_DIR" -maxdepth 1 -name "base-$SUITE-*.tar*" ! -name "${tarball##*/}" -delete
    fi
    log "base: $BASE_TAG ready in $((SECONDS - t0)) s"
}

# Wheels for every dependency, made on the host once (pip's own cache and indexes), handed to
# the builds as a read-only bind mount: builds then need the network only for what is missing.
build_wheelhouse() {
    local house="$IMAGES_DIR/wheels" stamp="$IMAGES_DIR/wheels/.stamp" py=${PYTHON:-python3}
    if [[ -f "$stamp" && "$stamp" -nt "$ROOT/pyproject.toml" ]]; then return 0; fi
    local t0=$SECONDS
    mkdir -p "$house"
    # the CPU torch wheel lies on local disk: copy it in (a plain `torch` from an index is the CUDA build)
    local torch_whl
    torch_whl=$("$py" -m pip download --no-deps -q -d "$house" "torch==2.13.0" >&2 && ls "$house"/torch-2.13.0*.whl | head -n1)
    case $torch_whl in
        *+cpu*) log "wheelhouse: torch from $torch_whl" ;;
        *) log "pip found no CPU build of torch 2.13.0 (got '${torch_whl:-nothing}'): put its wheel in $house"; exit 1 ;;
    esac
    "$py" -m pip wheel -q -w "$house" "setuptools>=68" "wheel" >&2
    "$py" -m pip wheel -q -w "$house" --find-links "$house" "torch==2.13.0" "$ROOT[operator,builder,serving]" >&2
    rm -f "$house"/optimodel-*.whl
    touch "$stamp"
    log "wheelhouse: $(find "$house" -name '*.whl' | wc -l) wheels in $((SECONDS - t0)) s"
}

build_image() {
    local name=$1 t0=$SECONDS dir
    case $name in
        operator) dir=optimodel_operator ;;
        builder) dir=builder_job ;;
        serving) dir=serving_image ;;
        *) log "unknown image '$name' (operator, builder, serving)"; exit 2 ;;
    esac
    local tag="localhost/optimodel/$name:$VERSION"
    buildah bud --quiet --isolation chroot --pull=never --layers \
        --build-arg BASE="$BASE_TAG" --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
        --volume "$HOST_CA:/run/host-ca.crt:ro" --volume "$IMAGES_DIR/wheels:/wheels:ro" \
        --target cpu -f "$ROOT/$dir/Dockerfile" -t "$tag" "$ROOT" >/dev/null
    # buildah's layer cache reuses a LABEL step (and ignores --label) when only an ARG changed:
    # stamp version and revision on the finished image
    local ctr
    ctr=$(buildah from --pull=never --quiet "$tag")
    buildah config --label org.opencontainers.image.version="$VERSION" \
        --label org.opencontainers.image.revision="$REVISION" "$ctr"
    buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
    if [[ -n "$REGISTRY" ]]; then
        podman tag "$tag" "$REGISTRY/$name:$VERSION"
        podman push "$REGISTRY/$name:$VERSION"
    fi
    local size
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    printf '%-9s %-36s %6d MB  built in %4d s\n' "$name" "$tag" $((size / 1000000)) $((SECONDS - t0))
}

main() {
    install_tools
    write_config
    build_base
    build_wheelhouse
    # no `podman image prune` here: the untagged images of the build stages are buildah's layer
    # cache (a rebuild with unchanged sources takes seconds); `make clean-images` drops it all
    printf '%-9s %-36s %9s  %s\n' image tag size "build time" 
    for name in $IMAGES; do build_image "$name"; done
}

main
