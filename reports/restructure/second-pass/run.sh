#!/bin/bash
# The timing-independent outputs of one tree, as compared in README.md here.
# usage: run.sh TREE OUTDIR PORT1 PORT2   (TREE: a checkout with commands/ and profiles/ linked into
# granite_cli/ so that PYTHONPATH=TREE imports that tree; PY: the Python of an installed environment)
set -u
TREE=$1; OUT=$2; PY=${PY:-python}
export PYTHONPATH=$TREE GRANITE_COMMIT=x
cd "$OUT"
$PY -m granite_cli memory-report -f json > memory.json 2> memory.err
$PY -m granite_cli convert --from-profile granite-4.0-h-350m src --dtype bf16 -f json > c1.json 2>&1
$PY -m granite_cli convert src m.gguf -f json > c2.json 2>&1
$PY -m granite_cli convert m.gguf back -f json > c3.json 2>&1
sha256sum src/* m.gguf back/* > sha.txt
$PY -m granite_cli convert --from-profile cpu-hybrid h.gguf --dtype bf16 --no-verify > /dev/null 2>&1
$PY -m granite_cli convert --from-profile cpu-dense d.gguf --dtype bf16 --no-verify > /dev/null 2>&1
$PY "$TREE/benchmarks/llama_server.py" h.gguf --port "$3" --slots 4 --ctx-per-slot 2048 --threads 1 > /dev/null 2>&1 &
P1=$!
$PY "$TREE/benchmarks/llama_server.py" d.gguf --port "$4" --slots 4 --ctx-per-slot 2048 --threads 1 > /dev/null 2>&1 &
P2=$!
sleep 20
$PY -m granite_cli bench --endpoint cpu-hybrid=http://127.0.0.1:$3 --endpoint cpu-dense=http://127.0.0.1:$4 \
    --ctx 128,512 --batch 1,2 --gen 8 -f json > serve.json 2> serve.err
kill $P1 $P2
$PY -m granite_cli bench -f json > bench.json 2> bench.err
