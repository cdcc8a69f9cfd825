#!/usr/bin/env bash
# One front door for every machine.
#   ./launch.sh                          run the default study (the "which loss?" report)
#   ./launch.sh test [pytest args]       run the test suite (what CI calls)
#   ./launch.sh {cpu|gpu|tpu} MODULE [flags]
#                                        run any entry point on that backend
# On a TPU pod, run the same line on every worker; LOSSJAX_DISTRIBUTED=1 is set for tpu
# so each process calls jax.distributed.initialize().
set -euo pipefail
cd "$(dirname "$0")"

VENV=${LOSSJAX_VENV:-.venv}
PY="$VENV/bin/python"

ensure_venv() {
  if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV"
  fi
  # Install once; a stamp keyed on pyproject.toml re-installs only when dependencies change.
  local stamp="$VENV/.lossjax-installed"
  local want
  want=$(sha1sum pyproject.toml | cut -d' ' -f1)
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "$PY" -m pip install --quiet --upgrade pip
    # The library needs jax, numpy and chex only; the harness and the tests add theirs.
    "$PY" -m pip install --quiet -e ".[experiments,test]"
    # tokamax is a benchmark reference only; the project works without it.
    "$PY" -m pip install --quiet tokamax >/dev/null 2>&1 \
      || echo "launch.sh: tokamax did not install; benchmarks will skip it" >&2
    echo "$want" >"$stamp"
  fi
}

ensure_speech_synthesizer() {
  # The speech-recognition experiment synthesizes its data set with espeak-ng.
  command -v espeak-ng >/dev/null && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq espeak-ng; } >/dev/null 2>&1 || true
  fi
  command -v espeak-ng >/dev/null \
    || echo "launch.sh: espeak-ng is missing; install it (Debian/Ubuntu: sudo apt-get install espeak-ng) for the speech experiment" >&2
}

ensure_backend() {
  case "$1" in
    cpu) export JAX_PLATFORMS=cpu ;;
    gpu)
      if [[ ! -f "$VENV/.lossjax-gpu" ]]; then
        "$PY" -m pip install --quiet "jax[cuda12]" && touch "$VENV/.lossjax-gpu"
      fi
      export JAX_PLATFORMS=cuda ;;
    tpu)
      if [[ ! -f "$VENV/.lossjax-tpu" ]]; then
        "$PY" -m pip install --quiet "jax[tpu]" && touch "$VENV/.lossjax-tpu"
      fi
      export JAX_PLATFORMS=tpu
      export LOSSJAX_DISTRIBUTED=${LOSSJAX_DISTRIBUTED:-1} ;;
  esac
}

cmd=${1:-study}
ensure_venv
ensure_speech_synthesizer
case "$cmd" in
  test)
    shift
    export JAX_PLATFORMS=cpu
    # A persistent compilation cache makes repeated runs several times faster; the
    # tests compile many small programs, so cache them all, not just the slow ones.
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}
    export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
    exec "$PY" -m pytest -n "${LOSSJAX_TEST_WORKERS:-2}" -q "$@"
    ;;
  cpu | gpu | tpu)
    [[ $# -ge 2 ]] || { echo "usage: ./launch.sh $cmd MODULE [flags]" >&2; exit 2; }
    ensure_backend "$cmd"
    module=$2
    shift 2
    exec "$PY" -m "$module" "$@"
    ;;
  study)
    if [[ -f experiments/study.py ]]; then
      exec "$PY" -m experiments.study --config=configs/study.py --workdir=runs/study
    fi
    exec "$PY" -c "import lossjax; lossjax.print_table()"
    ;;
  *)
    echo "unknown command '$cmd'; use: test | cpu | gpu | tpu MODULE [flags] | (nothing)" >&2
    exit 2
    ;;
esac
