#!/bin/bash
# The GPU check of issue 23: the batched trainer on a GPU through burn's wgpu
# backend (Vulkan), against PyTorch on the same GPU (CUDA). For a session lent
# a device machine (NVIDIA, nothing reachable from it). Prepare here, then run
# `bash bench/gpu_check.sh` there with `.gl` and `.gpu` carried:
#
#   p=$(git rev-parse --git-path info/exclude); printf '/.gl/\n/.gpu/\n' >> $p
#   CARGO_TARGET_DIR=~/.cache/astraea-gpu cargo build -p astraea-cli --features gpu --bin astraea
#   mkdir -p .gpu/data/mnist && strip -o /tmp/astraea ~/.cache/astraea-gpu/debug/astraea
#   gzip -9 -c /tmp/astraea > .gpu/astraea.gz     # 22 MB: the carry limit is 64 MiB
#   for f in data/mnist/*; do gzip -c $f > .gpu/data/mnist/$(basename $f).gz; done
#   mkdir -p .gl /tmp/amd64/partial; o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
#
# Results land in $OUT: smoke.txt, bench-gpu.txt (the table for docs/RESULTS.md),
# bench-cpu16.txt (the device's own CPU), paper-gpu.txt (a paper-style run).
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$VK_DRIVER_FILES" ] || { echo "no $VK_DRIVER_FILES"; ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1; unset VK_DRIVER_FILES; }
nvidia-smi -L; nproc
B=/tmp/astraea; gunzip -c .gpu/astraea.gz > $B; chmod +x $B
S() { echo "== $* $(date +%T)"; }
S smoke; timeout 90 $B bench simulate --device gpu --clients 10 --paths "batched, one stack" --repeats 1 --python /nonexistent --data-dir .gpu/data 2>&1 | grep -v "^\s*$" | tail -8 | tee $OUT/smoke.txt
S bench; timeout 230 $B bench simulate --device gpu --clients 50,500,2000 --samples 30 --paths "batched, one stack" --repeats 2 --threads 16 --python python3 --script bench/torch_simulate.py --data-dir .gpu/data > $OUT/bench-gpu.txt 2>&1; tail -20 $OUT/bench-gpu.txt
S cpu16; timeout 60 $B bench simulate --device cpu --clients 500 --paths "per-client;batched" --repeats 1 --threads 16 --python /nonexistent --data-dir .gpu/data > $OUT/bench-cpu16.txt 2>&1; tail -9 $OUT/bench-cpu16.txt
S paper; timeout 110 $B simulate --device gpu --stack 64 --threads 64 --strategies fedavg,astraea --rounds 20 --data-dir .gpu/data --out /tmp/paper > $OUT/paper-gpu.txt 2>&1; tail -12 $OUT/paper-gpu.txt
S done
