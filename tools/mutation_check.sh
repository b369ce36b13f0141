#!/usr/bin/env bash
# Shows that the emulation tier catches planted kernel bugs (run by hand, not in CI; ~10 min).
# Each mutation is applied alone to a copy of csrc/, the emulation is rebuilt from the copy (in
# its own build folder, seeded from build/emu-* so ninja recompiles only what changed), and the
# kernel tests that cover the mutated code run. A mutation the tier does not catch exits 1.
#   tools/mutation_check.sh            all mutations
#   tools/mutation_check.sh NAME...    some of them
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/fastnorm-mutation.XXXXXX)
ASAN_ENV=(LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
          ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)

# name | variant | file | python expression mutating `s` (the file's text) | pytest selection
MUTATIONS=(
  "no-syncthreads|plain|kernels/welford.cuh|s.replace('  if (lane == 0) shared[warp] = w;\n  __syncthreads();', '  if (lane == 0) shared[warp] = w;', 1)|tests/cuda/test_row_kernels.py -k layer_norm_fwd_bwd"
  "bound-off-by-one|asan|kernels/groups_forward.cuh|s.replace('if (valid \&\& pk < packs) {\n        const int j0 = pk * VEC;', 'if (valid \&\& pk <= packs) {\n        const int j0 = pk * VEC;', 1)|tests/cuda/test_row_kernels.py -k layer_norm_fwd_bwd"
  "divergent-shuffle|plain|kernels/welford.cuh|s.replace('v += __shfl_xor_sync(0xffffffffu, v, offset, width);', 'if ((threadIdx.x \& 31) < 16) v += __shfl_xor_sync(0xffffffffu, v, offset, width);', 1)|tests/cuda/test_row_kernels.py -k layer_norm_fwd_bwd"
  "dropped-store|plain|kernels/groups_forward.cuh|s.replace('      p.rstd[row] = rstd;\n', '', 1)|tests/cuda/test_row_kernels.py -k layer_norm_fwd_bwd"
  "lrn-rows-no-halo|plain|kernels/channels_positions.cuh|s.replace('const int64_t lo = (q.c0 - w.before > 0 ? q.c0 - w.before : 0) / V * V;', 'const int64_t lo = q.c0 / V * V;', 1)|tests/cuda/test_lrn_kernels.py -k rows_tiles"
  "lrn-rows-twin-order|plain|kernels/channels_positions.cuh|s.replace('for (int j = static_cast<int>(jlo - qlo); j <= static_cast<int>(jhi - qlo); ++j) tsum += qr[j];', 'for (int j = static_cast<int>(jhi - qlo); j >= static_cast<int>(jlo - qlo); --j) tsum += qr[j];', 1)|tests/cuda/test_lrn_kernels.py -k bitwise"
)

status=0
for m in "${MUTATIONS[@]}"; do
  IFS='|' read -r name variant file expr selection <<<"$m"
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  src="$WORK/$name/csrc"
  mkdir -p "$WORK/$name"
  cp -r csrc "$src"
  if ! "$PY" - "$src/$file" "$expr" <<'PYEOF'
import sys
path, expr = sys.argv[1], sys.argv[2].replace("\\&", "&")
s = open(path).read()
t = eval(expr)
if t == s:
    sys.exit(f"the mutation did not apply to {path}")
open(path, "w").write(t)
PYEOF
  then echo "mutation $name: NOT APPLIED"; status=1; continue; fi
  [ -d "build/emu-$variant" ] && cp -r "build/emu-$variant" "$WORK/$name/emu-$variant"
  export FASTNORM_EMU_SRC="$src" FASTNORM_EMU_BUILD="$WORK/$name"
  log="$WORK/$name/test.log"
  "$PY" tools/cuda_emu/emu.py build "$variant" >"$WORK/$name/build.log" 2>&1 || { echo "mutation $name: build failed (see $WORK/$name/build.log)"; status=1; continue; }
  if [ "$variant" = asan ]; then
    env "${ASAN_ENV[@]}" FASTNORM_EMU=asan FASTNORM_KERNEL_TARGETS=emu "$PY" -m pytest -x -q -p no:cacheprovider --capture=sys $selection >"$log" 2>&1
  else
    FASTNORM_EMU=plain FASTNORM_KERNEL_TARGETS=emu "$PY" -m pytest -x -q -p no:cacheprovider $selection >"$log" 2>&1
  fi
  rc=$?
  unset FASTNORM_EMU_SRC FASTNORM_EMU_BUILD
  if [ $rc -eq 0 ]; then
    echo "mutation $name ($variant): NOT CAUGHT"; status=1
  else
    first=$(grep -m1 -E "fastnorm emulator: [a-z]|ERROR: AddressSanitizer|runtime error|AssertionError|assert .* <=|max error" "$log" | cut -c1-220)
    echo "mutation $name ($variant): caught (pytest exit $rc) -- ${first:-see $log}"
  fi
done
echo "logs: $WORK"
exit $status
