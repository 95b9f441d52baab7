#!/usr/bin/env bash
# Runs the cargo-fuzz targets, each for SECONDS, seeded with the committed hostile corpus.
#   fuzz/run.sh 600               # header, index, merge and layout, 10 minutes each
#   fuzz/run.sh 60 header         # one target
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). A crash leaves its input in
# fuzz/artifacts/<target>/; add it to tests/hostile/ and fix the bug.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(header index merge layout)
hostile=../tests/hostile
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    case $t in
        header | merge) [ -d "$hostile" ] && find "$hostile" -name '*.safetensors' -size -64k -exec cp {} "seeds/$t/" \; || true ;;
        layout) for f in ../rust/layouts/*.json; do cp "$f" "seeds/$t/"; done ;;
        index) for f in "$hostile"/index/*/model.safetensors.index.json; do [ -f "$f" ] && cp "$f" "seeds/$t/$(basename "$(dirname "$f")").json"; done ;;
    esac
    echo "== $t: ${secs}s"
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -dict=safetensors.dict -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 2>&1 |
        grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|==[0-9]+==|thread .* panicked|SUMMARY|INFO: -max_total_time)' || true
done
