#!/usr/bin/env bash
# Every CPU row of the benchmark and the accuracy they are judged by, on the machine at hand, in
# one go (on 2 AVX-512 cores: the rpiae-b bundle 7.5 min at 18.4 GB peak, the eval 1.7 min, the
# bench 10.5 min):
#
#   bash scripts/cpu_targets.sh TAG [WORK]    # TAG names the results, e.g. intel-xeon-amx
#
# 1. real photos (the 9 offline samples and 300 seeded crops) and a calibration set;
# 2. a bundle of the shipped tiny checkpoint (fp32 + int8), and `rpiae eval` of every CPU runtime
#    and precision on the photos -> bench/results/eval/rpiae-tiny-cpu-precisions-TAG.json;
# 3. the paper-size bundle (seeded rpiae-b, fp32 + int8: speed does not depend on the values);
# 4. `rpiae bench` of every CPU backend and precision at batch 1 and 8, 2 threads, with op
#    profiles, its accuracy-bound targets judged by that eval -> bench/results/cpu-2c-TAG.json.
#
# Precisions a CPU cannot run (bf16 without AMX or AVX512-BF16) are reported as skipped with the
# reason, not measured. WORK (default: a new temporary directory) keeps the photos and bundles.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: bash scripts/cpu_targets.sh TAG [WORK]}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
backends=torch,ort,openvino,openvino-int8-bf16
eval_json=bench/results/eval/rpiae-tiny-cpu-precisions-$tag.json
echo "CPU flags: $(grep -o -E -w "avx2|avx512f|avx512_vnni|avx512_bf16|amx_bf16|amx_int8" /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "work: $work"

[ -d "$work/photos" ] || python scripts/eval_crops.py --out "$work/photos"
[ -d "$work/calib" ] || rpiae samples "$work/calib"
[ -f "$work/tiny/manifest.json" ] || rpiae export --precision fp32,int8 --int8-high-precision fp32 \
    --calib "$work/calib" --out "$work/tiny"
rpiae eval "$work/photos" --model "$work/tiny" --backend "$backends" --precision fp32,bf16,int8 --json "$eval_json"
[ -f "$work/rpiae-b/manifest.json" ] || python scripts/bench_bundle.py --out "$work/rpiae-b"
rpiae bench --model "$work/rpiae-b" --backends "$backends" --precision fp32,bf16,int8 --batch 1,8 --threads 2 \
    --warmup 1 --min-iters 3 --min-time 5 --max-time 90 --profile --accuracy "$eval_json" \
    --out "bench/results/cpu-2c-$tag.json"
echo "wrote $eval_json and bench/results/cpu-2c-$tag.json; add the file to the report command in bench/results/README.md's header and re-render it"
