#!/usr/bin/env bash
# Profile one decode under Nsight Systems and print its per-round phase table.
#   profiling/nsys.sh [decode flags] "prompt"      (OUT=name sets the report name)
# Only the generation is captured (the NVTX range "generate"), not loading or warm-up.
set -euo pipefail
out=${OUT:-hybrid_sd_profile}
# NVTX capture ranges match unregistered strings only with this set.
export NSYS_NVTX_PROFILER_REGISTER_ONLY=0
nsys profile --trace=cuda,nvtx,osrt --capture-range=nvtx --nvtx-capture=generate \
    --capture-range-end=stop --force-overwrite=true -o "$out" python -m hybrid_sd.decode "$@"
nsys export --type sqlite --force-overwrite=true -o "$out.sqlite" "$out.nsys-rep"
python -m hybrid_sd.profiling.report "$out.sqlite"
