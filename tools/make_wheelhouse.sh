#!/usr/bin/env bash
# Gather every wheel that requirements-cluster.txt needs, torch excepted, into one folder that can be
# carried to a machine without network (README.md, "Air-gapped clusters"):
#
#   tools/make_wheelhouse.sh TARGET_DIR [--python 3.12] [--platform manylinux_2_28_x86_64] [--max-mib 64]
#                            [--requirements FILE ...]     (default: requirements-cluster.txt; repeatable)
#
# then, on the cluster, in an environment that already has torch, from the repository root:
#
#   pip install --no-index --find-links TARGET_DIR -r requirements-cluster.txt
#
# * Install with the very interpreter that imports torch (`python3 -m pip install ...` of that python3). When it is
#   itself a venv (the GPU machine's python3 is one), never make a venv from it: a venv of a venv, even with
#   --system-site-packages, sees the BASE interpreter's packages, not the torch of the venv it was made from, and
#   pip then finds no torch for megatron-core and DeepSpeed. benchmarks/gpu_run.py --wheelhouse installs into the
#   interpreter itself with torch pinned to its installed build (or with --target + PYTHONPATH when its
#   site-packages is read-only); add `-c` with a `torch==<installed version>` line to do the same by hand.
# * Without --python/--platform the wheels are for the Python running this script, on this machine.
# * With them, only binary wheels for that interpreter and platform are taken (--only-binary=:all:); a manylinux
#   platform also accepts the older manylinux tags (a wheel built for glibc 2.17 runs on 2.28).
# * DeepSpeed ships only a source distribution: it is built here into a pure-Python wheel with its C++/CUDA
#   ops left to just-in-time compilation (DS_BUILD_OPS=0), without build isolation, so that no build
#   environment ever downloads a torch.
# * torch is never downloaded: dependency resolution runs against a metadata-only stand-in torch wheel
#   (version 2.11.0, the oldest supported), which is removed afterwards. Resolving against a real index would
#   fetch a multi-GB CUDA build (ENGINES_ON_CPU.md §0.1).
# * setuptools is added: the build backend of `-e .` (the project itself) when pip installs it offline.
# * The folder must stay under --max-mib MiB (default 64: what one call to the GPU machine can carry); the
#   script fails when it does not. It writes SHA256SUMS and prints the total size.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQUIREMENTS=()
PY_VERSION=""
PLATFORM=""
MAX_MIB=64
TARGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY_VERSION=${2:?--python needs a version such as 3.12}; shift 2 ;;
    --platform) PLATFORM=${2:?--platform needs a tag such as manylinux_2_28_x86_64}; shift 2 ;;
    --max-mib) MAX_MIB=${2:?--max-mib needs a number}; shift 2 ;;
    --requirements) REQUIREMENTS+=("${2:?--requirements needs a file}"); shift 2 ;;
    -h|--help) usage ;;
    -*) echo "make_wheelhouse.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$TARGET" ] || { echo "make_wheelhouse.sh: one TARGET_DIR only" >&2; exit 2; }; TARGET=$1; shift ;;
  esac
done
[ -n "$TARGET" ] || usage
[ ${#REQUIREMENTS[@]} -gt 0 ] || REQUIREMENTS=("$ROOT/requirements-cluster.txt")
PYTHON=${PYTHON:-python}
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
if compgen -G "$TARGET/*.whl" >/dev/null; then  # pip would keep old versions beside new ones
  echo "make_wheelhouse.sh: $TARGET already holds wheels; give a new or empty folder" >&2; exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# ---- requirement lines other than torch and the project itself ------------------------------------------
cat "${REQUIREMENTS[@]}" | grep -vE '^\s*(#|$|-e\b|torch\s*([<>=!~;]|$))' | sed -e 's/\s*#.*//' -e 's/\s*$//' > "$WORK/requirements.txt"
if grep -qE '^-' "$WORK/requirements.txt"; then
  echo "make_wheelhouse.sh: only plain requirement lines (and -e .) are supported:" >&2
  grep -E '^-' "$WORK/requirements.txt" >&2; exit 2
fi
DS_PIN=$(grep -E '^deepspeed' "$WORK/requirements.txt" | head -n 1 || true)
if [ -n "$DS_PIN" ] && ! [[ "$DS_PIN" =~ ^deepspeed==[0-9.]+$ ]]; then
  echo "make_wheelhouse.sh: pin DeepSpeed exactly (deepspeed==VERSION), not '$DS_PIN'" >&2; exit 2
fi

# ---- pip flags for the target interpreter/platform ----------------------------------------------------------
TARGET_FLAGS=()
if [ -n "$PY_VERSION" ] || [ -n "$PLATFORM" ]; then
  TARGET_FLAGS+=(--only-binary=:all: --implementation cp)
  [ -z "$PY_VERSION" ] || TARGET_FLAGS+=(--python-version "$PY_VERSION")
  if [[ "$PLATFORM" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then  # the given glibc and every older manylinux tag
    for ((n = BASH_REMATCH[1]; n >= 17; n--)); do TARGET_FLAGS+=(--platform "manylinux_2_${n}_${BASH_REMATCH[2]}"); done
    TARGET_FLAGS+=(--platform "manylinux2014_${BASH_REMATCH[2]}" --platform "manylinux1_${BASH_REMATCH[2]}")
  elif [ -n "$PLATFORM" ]; then
    TARGET_FLAGS+=(--platform "$PLATFORM")
  fi
fi

# ---- 1. DeepSpeed: sdist -> pure-Python wheel, ops left to JIT, no build isolation -----------------------------
if [ -n "$DS_PIN" ]; then
  "$PYTHON" -c "import setuptools" 2>/dev/null || {
    echo "make_wheelhouse.sh: building DeepSpeed's wheel without build isolation needs setuptools in $("$PYTHON" -c 'import sys; print(sys.prefix)'): pip install setuptools" >&2; exit 2; }
  echo "make_wheelhouse: building $DS_PIN into a wheel (DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "$DS_PIN" -w "$WORK/deepspeed" \
    > "$WORK/deepspeed.log" 2>&1 || { cat "$WORK/deepspeed.log" >&2; exit 1; }
  cp "$WORK"/deepspeed/deepspeed-*.whl "$TARGET/"
fi

# ---- 2. a stand-in torch wheel (metadata only) so that resolution never downloads torch ------------------------
STUB_VERSION=2.11.0+wheelhouse.stub
"$PYTHON" - "$WORK/stub" "$STUB_VERSION" <<'EOF'
import base64, hashlib, os, sys, zipfile
out, version = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
info = f"torch-{version}.dist-info"
files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
         f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: make_wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t)}"
          for n, t in files.items()] + [f"{info}/RECORD,,"]
files[f"{info}/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(os.path.join(out, f"torch-{version}-py3-none-any.whl"), "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
EOF
echo "torch==$STUB_VERSION" > "$WORK/constraints.txt"

# ---- 3. everything else, resolved for the target (the built DeepSpeed wheel is found in TARGET) ---------------
echo "make_wheelhouse: downloading the other requirements ${TARGET_FLAGS[*]:-(this interpreter)}"
PIP_CONSTRAINT="$WORK/constraints.txt" "$PYTHON" -m pip download -q -d "$TARGET" \
  --find-links "$WORK/stub" --find-links "$TARGET" "${TARGET_FLAGS[@]}" \
  -r "$WORK/requirements.txt" "setuptools>=64" 2> >(grep -v "is neither a file nor a directory" >&2)
rm -f "$TARGET"/torch-*.whl
if ls "$TARGET"/*.tar.gz "$TARGET"/*.zip >/dev/null 2>&1; then
  echo "make_wheelhouse.sh: source distributions in $TARGET (no wheel for this target):" >&2
  ls "$TARGET"/*.tar.gz "$TARGET"/*.zip >&2 2>/dev/null || true
  exit 1
fi

# ---- 4. checksums and the size limit --------------------------------------------------------------------------
(cd "$TARGET" && sha256sum ./*.whl | sed 's# \./# #' > SHA256SUMS)
BYTES=$(du -cb "$TARGET"/*.whl | tail -n 1 | cut -f1)
MIB=$(( (BYTES + 1048575) / 1048576 ))
echo "make_wheelhouse: $(ls "$TARGET"/*.whl | wc -l) wheels, ${MIB} MiB ($BYTES bytes) in $TARGET"
if [ "$BYTES" -gt $(( MAX_MIB * 1048576 )) ]; then
  echo "make_wheelhouse.sh: the wheelhouse is larger than --max-mib $MAX_MIB MiB; largest wheels:" >&2
  ls -S -l "$TARGET"/*.whl | head -n 5 >&2
  exit 1
fi
