export PYTHONUNBUFFERED=1
timeout 200 python -m pytest -q -p no:logging --show-capture=no --tb=short tests/test_decode_graphs_cuda.py tests/test_decode_graphs.py > $OUT/dg_tests.log 2>&1; echo dg tests rc $?; tail -25 $OUT/dg_tests.log
timeout 330 python -m benchmarks compile --parts generate --reps 3 --budget-s 300 --out $OUT/gen.jsonl > $OUT/gen.log 2>&1; echo gen rc $?; grep -A40 "| case" $OUT/gen.log | head -45
