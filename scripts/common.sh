# Shared by scripts/demo and scripts/test: install what is missing (Debian 12), then configure and
# build. Sourced, not run.

# Debian packages the build needs; libdnnl-dev, libopenblas-dev and libblis-dev are optional (faster
# frozen products when present: lora::onednn, lora::blas).
LORA_APT_PACKAGES=(g++ cmake ninja-build pkg-config libeigen3-dev nlohmann-json3-dev libgtest-dev
  libbenchmark-dev zlib1g-dev)
LORA_APT_OPTIONAL=(libdnnl-dev libopenblas-dev libblis-dev)

lora_missing_packages() {
  local missing=()
  for p in "${LORA_APT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]}"
}

# Optional packages that are not installed (empty when all are).
lora_missing_optional() {
  local missing=()
  for p in "${LORA_APT_OPTIONAL[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]}"
}

lora_ensure_dependencies() {
  local missing optional
  missing=$(lora_missing_packages "$@")
  optional=$(lora_missing_optional)
  [ -z "$missing" ] && [ -z "$optional" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    if [ -n "$missing" ]; then
      echo "Installing: $missing"
      # shellcheck disable=SC2086
      apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
    # Optional packages: install when the archive has them, carry on without otherwise.
    if [ -n "$optional" ]; then
      echo "Installing (optional): $optional"
      # shellcheck disable=SC2086
      apt-get install -y -qq --no-install-recommends $optional >/dev/null 2>&1 ||
        echo "Optional packages unavailable; building without them: $optional" >&2
    fi
  elif [ -n "$missing" ]; then
    echo "Missing packages. Run this once, then run this script again:" >&2
    echo "  sudo apt-get install -y $missing $optional" >&2
    exit 1
  else
    echo "Note: optional $optional not installed (sudo apt-get install -y $optional); building without" >&2
  fi
}

# Every option of the full build, set explicitly: scripts/demo and scripts/test share build/, and a
# CMake cache keeps whatever an earlier configure set, so neither may rely on a default.
LORA_FULL_OPTIONS=(-DCMAKE_BUILD_TYPE=Release -DLORA_WERROR=ON -DLORA_NATIVE=ON
  -DLORA_BUILD_TESTS=ON -DLORA_BUILD_EXAMPLES=ON -DLORA_BUILD_BENCHMARKS=ON
  -DLORA_BUILD_FUZZERS=OFF -DLORA_INSTALL=ON -DLORA_UNITY_TESTS=ON
  -DLORA_WITH_ONEDNN=ON -DLORA_WITH_MPI=ON -DLORA_BUILD_COMPILED=ON)

# lora_configure BUILD_DIR: configure the full build (every option above). The tests compare with
# llama.cpp's own prebuilt libraries: fetched first (scripts/fetch_llama_cpp, npm), or the build fails.
lora_configure() {
  bash "$LORA_ROOT/scripts/fetch_llama_cpp"
  cmake -S "$LORA_ROOT" -B "$1" -G Ninja "${LORA_FULL_OPTIONS[@]}" >/dev/null
}

# lora_build BUILD_DIR [TARGET...]: configure the full build, then build TARGETs (default: all).
lora_build() {
  local dir=$1
  shift
  lora_configure "$dir"
  if [ $# -gt 0 ]; then
    cmake --build "$dir" -j "$(nproc)" --target "$@"
  else
    cmake --build "$dir" -j "$(nproc)"
  fi
}
