#!/bin/bash
cd "$(dirname "$0")/../../.."  # the repository root
for round in 1 2; do
  for mode in share no-share; do
    date +%T >> ${OUT:-reports/bench/cpu-share-prefill}/log
    .venv/bin/granite bench -m cpu-hybrid -m cpu-dense --ctx 4k-16k*2 --phase prefill --${mode}-prefill --jsonl ${OUT:-reports/bench/cpu-share-prefill}/${mode}-${round}.jsonl -f json > ${OUT:-reports/bench/cpu-share-prefill}/${mode}-${round}.json 2>> ${OUT:-reports/bench/cpu-share-prefill}/log
  done
done
date +%T >> ${OUT:-reports/bench/cpu-share-prefill}/log
