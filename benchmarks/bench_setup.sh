#!/usr/bin/env bash
# The set-up's time: `make setup` in a fresh clone and the first imports of every stage, for this
# checkout's Makefile against a baseline Makefile from git (default c31c6e0: pip byte-compiling nothing,
# then `python -m compileall -j 0` over the venv), run one after the other on the same machine.
#
#   benchmarks/bench_setup.sh [BASELINE_REV]
#
# Each variant: a clone of HEAD in a temporary folder with that Makefile, `make setup` timed (uv with an
# empty cache of its own, so the new set-up pays its downloads), then each stage module imported once in
# its own process in dvc.yaml's order, twice (the first pass writes bytecode where the Makefile lets
# Python write it). Prints seconds per row and the ratio of the totals. About 6 minutes on 2 cores.
set -euo pipefail
BASE=${1:-c31c6e0}
REPO=$(git rev-parse --show-toplevel)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGES=$(grep -oE 'python -m stages\.[a-z_]+' "$REPO/dvc.yaml" | awk '{print $3}' | uniq)

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

imports() {  # $1: the PYTHONDONTWRITEBYTECODE a recipe of that Makefile exports
  local t0
  t0=$(now)
  for m in $STAGES; do PYTHONDONTWRITEBYTECODE=$1 .venv/bin/python -c "import $m" >/dev/null 2>&1; done
  since "$t0"
}

run() {  # $1: label, $2: Makefile source (a rev, or "HEAD-worktree")
  local dir="$WORK/$1" t0 dwb setup first second
  git clone -q "$REPO" "$dir"
  if [ "$2" = "HEAD-worktree" ]; then cp "$REPO/Makefile" "$dir/Makefile"; else git -C "$dir" show "$2:Makefile" >"$dir/Makefile"; fi
  # what the Makefile exports to its recipes: the machine's value unless it sets its own
  if grep -q '^export PYTHONDONTWRITEBYTECODE' "$dir/Makefile"; then dwb=""; else dwb=${PYTHONDONTWRITEBYTECODE:-}; fi
  cd "$dir"
  t0=$(now)
  UV_CACHE_DIR="$WORK/uv-cache-$1" make -s setup >"$WORK/$1.setup.log" 2>&1 || { cat "$WORK/$1.setup.log"; exit 1; }
  setup=$(since "$t0")
  first=$(imports "$dwb")
  second=$(imports "$dwb")
  cd "$REPO"
  printf '%-10s setup %6.1f s   stage imports %6.1f s first, %6.1f s second   total %6.1f s\n' \
    "$1" "$setup" "$first" "$second" "$(echo "$setup + $first" | bc)"
  echo "$setup + $first" | bc >"$WORK/$1.total"
}

echo "make setup + the first import of each of $(echo $STAGES | wc -w) stages; baseline Makefile: $BASE"
run baseline "$BASE"
run current HEAD-worktree
b=$(cat "$WORK/baseline.total")
c=$(cat "$WORK/current.total")
printf 'set-up and first imports: %.1f s -> %.1f s (%.2fx the baseline)\n' "$b" "$c" "$(echo "$c / $b" | bc -l)"
