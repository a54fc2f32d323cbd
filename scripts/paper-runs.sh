#!/bin/bash
# Issue 17's full-length runs of the paper's comparison (docs/benchmarks.md §4): 10 local epochs, whole shards,
# heterogeneous then homogeneous, FedCache and local on 3 seeds, the other methods on seed 0. Hours on 2 cores.
# Seed-major steps, each with --reuse: an interrupted chain leaves comparable pairs, and running it again
# resumes where it stopped. Logs: runs/comparison-<setting>-e10*.log.
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
export OMP_NUM_THREADS=1
H=(--setting heterogeneous --epochs 10 --reuse --out runs/comparison-heterogeneous-e10)
# The bench runs methods in its own order (fd before local), so local gets a step of its own first.
python -m bench comparison "${H[@]}" --methods fedcache,local --seeds 0 > runs/comparison-heterogeneous-e10.step0.log 2>&1
python -m bench comparison "${H[@]}" --methods fedcache,local,fd --seeds 0 > runs/comparison-heterogeneous-e10.step1.log 2>&1
python -m bench comparison "${H[@]}" --methods fedcache,local,fd --seeds 0,1 > runs/comparison-heterogeneous-e10.step2.log 2>&1
python -m bench comparison "${H[@]}" --methods fedcache,local,fd --seeds 0,1,2 > runs/comparison-heterogeneous-e10.step3.log 2>&1
python -m bench comparison "${H[@]}" --methods "fedcache,fedcache raw R,fd,local" --seeds 0,1,2 \
    > runs/comparison-heterogeneous-e10.log 2>&1
python -m bench comparison "${H[@]}" --methods "fedcache,fedcache warm-up 2 every 2 epochs i8b x16,local" --seeds 0 \
    > runs/comparison-heterogeneous-e10.warm-up.log 2>&1
M=(--setting homogeneous --epochs 10 --reuse --out runs/comparison-homogeneous-e10)
python -m bench comparison "${M[@]}" --methods fedcache,local,fd,fedavg --seeds 0 > runs/comparison-homogeneous-e10.step1.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache,fedcache every 2 epochs i8" --seeds 0 \
    > runs/comparison-homogeneous-e10.step2.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache every 2 epochs i8 x16,fedcache every 2 epochs i8b x16,fedavg" \
    --seeds 0 > runs/comparison-homogeneous-e10.step3.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache warm-up 1 every 2 epochs i8b x16,fedcache warm-up 2 every 2 epochs i8b x16,fedavg" \
    --seeds 0 > runs/comparison-homogeneous-e10.step4.log 2>&1
# Seed 1 of the warm-up method against FedAvg at seed 1 (the bytes goal), and the paper's FedCache and local at seed 1.
python -m bench comparison "${M[@]}" --methods "fedcache warm-up 2 every 2 epochs i8b x16,fedavg" --seeds 1 \
    > runs/comparison-homogeneous-e10.step5.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache,local" --seeds 1 > runs/comparison-homogeneous-e10.step6.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache,fedcache raw R,fd,local" --seeds 0 \
    > runs/comparison-homogeneous-e10.step7.log 2>&1
python -m bench comparison "${M[@]}" --methods "fedcache,fedcache raw R,fedcache every 2 epochs i8,fd,fedavg,local" --seeds 0,1,2 \
    > runs/comparison-homogeneous-e10.log 2>&1
