#!/bin/bash
# 20 consecutive runs of the million-packet flood test in one guest (issue 14):
#   .venv/bin/ipvs-synproxy vm exec --topology --timeout 5400 -- bash tools/repeat-flood-test.sh
pass=0
for i in $(seq 1 20); do
  t0=$(date +%s)
  if python -m pytest -q -p no:cacheprovider -s tests/vm/test_synproxy_hardening.py -k million_packet > /tmp/flood-run.log 2>&1; then
    pass=$((pass+1)); r=PASS
  else
    r=FAIL; cat /tmp/flood-run.log | tail -30
  fi
  echo "run $i: $r in $(( $(date +%s) - t0 )) s; $(grep -E '^flood:|table empty' /tmp/flood-run.log | tr '\n' ' ')"
done
echo "passed $pass of 20"
