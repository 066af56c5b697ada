#!/usr/bin/env bash
# The GPU rows of docs/speed.md: the SD 1.5 architecture (random weights, no download) at
# 512 px with 3 subtasks, both schedules in every run; fp16 and bf16 weights, with and without
# torch.compile, with and without --low_memory; fp16 with channels_last; fp16 with keep-aware sampling and one kept object (4n - 2 samples
# in the one call, the shapes preset's); the fp32-weights/16-mixed row of
# configs/sd15.yaml; the SDXL architecture at 1024 px in fp16, with and without --low_memory; and fp16 with
# the compile modes reduce-overhead (CUDA graphs) and max-autotune (compilation timed apart from the steps).
# One JSON per row in OUT_DIR, then a summary table.  Not yet run on a GPU: its duration is an estimate
# (about 10 minutes on one H100-class card, most of it compiling).
#   bash tools/bench/gpu_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile false --low_memory false --sync_check true --json "$OUT/fp16.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile false --low_memory true --json "$OUT/fp16_lowmem.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile true --low_memory false --json "$OUT/fp16_compile.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile true --low_memory true --json "$OUT/fp16_compile_lowmem.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype bfloat16 --compile false --low_memory false --json "$OUT/bf16.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype bfloat16 --compile false --low_memory true --json "$OUT/bf16_lowmem.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype bfloat16 --compile true --low_memory false --json "$OUT/bf16_compile.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype bfloat16 --compile true --low_memory true --json "$OUT/bf16_compile_lowmem.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --batched_noise keep_aware --keep 1 --compile false --low_memory false --json "$OUT/fp16_keep_aware.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --channels_last true --compile false --low_memory false --json "$OUT/fp16_channels_last.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float32 --precision 16-mixed --compile false --low_memory false --sync_check true --json "$OUT/fp32_16mixed.json"
python tools/bench/benchmark.py --arch sdxl --resolution 1024 --subtasks 3 --device cuda --steps 10 --warmup 3 --repeats 3 --dtype float16 --compile false --low_memory false --json "$OUT/sdxl_fp16.json"
python tools/bench/benchmark.py --arch sdxl --resolution 1024 --subtasks 3 --device cuda --steps 10 --warmup 3 --repeats 3 --dtype float16 --compile false --low_memory true --json "$OUT/sdxl_fp16_lowmem.json"
# The compile modes last (the longest compilations): CUDA graphs (reduce-overhead) and kernel search.
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile reduce-overhead --low_memory false --json "$OUT/fp16_compile_reduce_overhead.json"
python tools/bench/benchmark.py --arch sd15 --resolution 512 --subtasks 3 --device cuda --steps 20 --warmup 5 --repeats 3 --dtype float16 --compile max-autotune --low_memory false --json "$OUT/fp16_compile_max_autotune.json"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print(f"{'row':<22} {'seq s/step':>10} {'bat s/step':>10} {'ratio':>6} {'bat s/500':>9} {'seq MiB':>8} {'bat MiB':>8} {'compile s':>9}")
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    s, b = r["sequential"], r["batched"]
    print(f"{f.stem:<22} {s['s_per_step']:>10.4f} {b['s_per_step']:>10.4f} {r['ratio']:>6.2f} {b['s_per_500_steps']:>9.1f} "
          f"{s['peak_mem_mb']:>8.0f} {b['peak_mem_mb']:>8.0f} {b.get('compile_s', 0.0):>9.1f}  {r['device_name']}")
PY
