#!/usr/bin/env bash
# The wheel on every CPython we support: takes the release abi3 wheel given as $1 (or builds it with
# `maturin build --release`) and installs it into a fresh venv of CPython 3.10, 3.12 and 3.13 (pyenv's,
# under ~/.pyenv/versions) with no Rust toolchain on PATH. In each venv: the demo, `inspect` with a
# custom layout in TOML (3.10 reads it with tomli), and a small import-and-merge smoke test of the
# Python API. Prints one line per interpreter with its time; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

wheel=${1:-}
if [ -z "$wheel" ]; then
    rm -rf target/wheel-matrix
    maturin build --release --out target/wheel-matrix >/dev/null
    wheel=$(ls target/wheel-matrix/*.whl)
fi
case "$(basename "$wheel")" in
    *-cp310-abi3-manylinux*.whl) ;;
    *) echo "not a cp310-abi3 manylinux wheel: $wheel" >&2; exit 1 ;;
esac
wheel=$(realpath "$wheel")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A layout file in TOML, written the way a user would (the Llama naming under another name).
cat > "$work/my-llama.toml" <<'TOML'
name = "my-llama"
description = "Llama written as a custom TOML layout"
layer = '^model\.layers\.(\d+)\.'
attention = '^self_attn\.'
mlp = '^mlp\.'
norms = '^(input_layernorm|post_attention_layernorm)\.'
targets = '^(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$'
vocab = '^(model\.embed_tokens|lm_head)\.weight$'
TOML
cat > "$work/smoke.py" <<'PY'
import sys
from pathlib import Path

import layerswap_fast as lsf
from layerswap_fast import synth

root, layout = Path(sys.argv[1]), Path(sys.argv[2])
cfg = synth.LlamaConfig(n_layers=2, hidden=32, intermediate=64, heads=2, kv_heads=1, vocab=64)
paths = synth.make_trio(root / "trio", cfg)
plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], layout=layout)
assert plan.layout == "my-llama" and len(plan.units) == 2, plan
again = lsf.Plan.from_json(plan.to_json())
assert [u.decision for u in again.units] == [u.decision for u in plan.units]
report = lsf.merge(paths["base"], paths["safety"], paths["expert"], root / "merged", granularity="module")
assert report["output"]["tensors"] > 0 and (root / "merged" / "model.safetensors").is_file()
assert len(report["units"]) == 4 and {u["decision"] for u in report["units"]} <= {"safety", "expert", "blend"}
try:
    lsf.merge(paths["base"], paths["safety"], paths["expert"], root / "merged")
except lsf.OutputExistsError:
    pass
else:
    raise AssertionError("an existing output was not refused")
print(f"layerswap-fast {lsf.__version__}: analyze with the TOML layout, merge, refusal ok")
PY

# No Rust on PATH: the venv and the system directories only (checked below).
clean_path=/usr/local/bin:/usr/bin:/bin
for want in 3.10 3.12 3.13; do
    start=$SECONDS
    py=$(ls -d "$HOME"/.pyenv/versions/"$want".*/bin/python3 2>/dev/null | sort -V | tail -1)
    [ -n "$py" ] || { echo "CPython $want not found under ~/.pyenv/versions" >&2; exit 1; }
    venv="$work/venv-$want"
    "$py" -m venv "$venv"
    run() { env -i HOME="$HOME" PATH="$venv/bin:$clean_path" LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_ROOT_USER_ACTION=ignore "$@"; }
    if run sh -c 'command -v cargo || command -v rustc || command -v rustup' >/dev/null; then
        echo "a Rust toolchain is on PATH in the $want venv" >&2; exit 1
    fi
    run python -m pip install -q "$wheel"
    run layerswap-fast demo "$work/demo-$want" >/dev/null
    run layerswap-fast inspect "$work/demo-$want/expert" --layout "$work/my-llama.toml" | grep -q "my-llama" \
        || { echo "inspect --layout my-llama.toml did not use the layout on CPython $want" >&2; exit 1; }
    line=$(run python "$work/smoke.py" "$work/smoke-$want" "$work/my-llama.toml")
    version=$("$venv/bin/python" -c 'import platform; print(platform.python_version())')
    echo "wheel matrix: $(basename "$wheel") on CPython $version: ok in $((SECONDS - start)) s (demo; inspect --layout TOML; $line)"
done
