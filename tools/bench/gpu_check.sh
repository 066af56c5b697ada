#!/usr/bin/env bash
# The GPU check run on a lent GPU (docs/configuration.md, "Checked on a GPU"): the main command on CUDA at three
# precisions, the xformers request's fallback, and the whole test suite with CUDA visible.
# Usage: OUT=/some/folder bash tools/bench/gpu_check.sh   (needs the package importable: pip install -e .)
set -u
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
E="python3 -m gas_lightning.cli --config configs/shapes.yaml --trainer.accelerator gpu"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
for p in 32-true bf16-mixed 16-mixed; do
  s=$(date +%s.%N)
  $E --trainer.precision $p --output_dir /tmp/gpu_check/$p > "$OUT/edit-$p.log" 2>&1
  rc=$?
  echo "precision $p: rc=$rc, $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s wall (process start included)"
  grep -E "attention backend|error" "$OUT/edit-$p.log" | head -n 3
  cp /tmp/gpu_check/$p/edited.png "$OUT/edited-$p.png" 2>/dev/null
done
$E --attention xformers --trainer.max_steps 2 --output_dir /tmp/gpu_check/xformers 2>&1 | grep -iE "xformers|attention backend" | head -n 3
python3 - <<'PY'
import numpy as np
from PIL import Image
a = {p: np.asarray(Image.open(f"/tmp/gpu_check/{p}/edited.png"), dtype=np.float64) for p in ("32-true", "bf16-mixed", "16-mixed")}
for p in ("bf16-mixed", "16-mixed"):
    mse = np.mean((a[p] - a["32-true"]) ** 2)
    print(f"{p} vs 32-true: PSNR {10 * np.log10(255 ** 2 / max(mse, 1e-12)):.1f} dB")
PY
timeout 200 python3 -m pytest -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?: $(tail -n 1 "$OUT/pytest.log")"
