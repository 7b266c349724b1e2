#!/usr/bin/env bash
# The main job, on whatever this machine is:
#   ./run.sh                 CUDA GPUs + FineWeb shards in DATA_PATH: the submitted run under torchrun;
#                            otherwise: build the embedded corpus and run the small configuration
#   ./run.sh test            the test suite (what CI runs)
#   ./run.sh gpu-check       one-command check of the CUDA path (CPU path at reduced size without CUDA)
#   ./run.sh seeds 1337 42 2024 [--ref-mean M --ref-std S --ref-n N]   one run per seed + statistics
#   ./run.sh verify ARTIFACT [--log L] [--script F] [--seed S] [--probes K] [--tokens N]   check an artifact's score
# Settings are environment variables named as in train_gpt.py (SEED=42 ./run.sh, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
mode="${1:-main}"
usage="usage: ./run.sh [main|test|gpu-check|seeds SEED... [--ref-mean M --ref-std S --ref-n N]|verify ARTIFACT [options: ./run.sh verify --help]]"
case "$mode" in
    -h|--help|help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; echo "$usage"; exit 0 ;;
    main|test|gpu-check|seeds|verify) ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

# Use the current Python if it already has the dependencies (e.g. a GPU host with its own CUDA torch);
# otherwise install requirements.txt into .venv (the pinned torch is the CPU build on this project's machines).
python_bin=python3
if ! python3 -c "import torch, numpy, sentencepiece" 2>/dev/null || [ "$mode" = test ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q -r requirements.txt
    python_bin=.venv/bin/python
fi

gpus=$("$python_bin" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -eq 0 ]; then
    # CPU runs: one thread per process unless told otherwise, so another program holding a core cannot stall
    # the run's threads (an earlier session saw 73-79 s/step with torch's default vs 2.4 s/step with one thread;
    # with torch 2.13 here, logs/cpu_threads_steptime.txt: 2 threads 1.2x faster idle, 1.2x slower busy).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    echo "run.sh: CPU run with OMP_NUM_THREADS=$OMP_NUM_THREADS (set it to change)"
fi
vocab="${VOCAB_SIZE:-1024}"     # the embedded corpus and the default data paths follow the vocabulary
corpus="data/embedded/sp$vocab"
nproc=1
for n in 8 4 2 1; do  # grad accumulation is 8 / WORLD_SIZE: use the largest divisor of 8 we have
    if [ "$gpus" -ge "$n" ]; then nproc=$n; break; fi
done

embedded_settings() {
    # The small-but-complete configuration for a CPU (every component on). 6x128, 16,384-token steps of
    # 2.7 s on one thread (logs/run_20261126_023252.txt, idle machine): the ~320 s of training read 1.9M
    # tokens, 0.55 epochs of the ~3.4M-token train split (fewer with a busy core: the budget is wall
    # clock), so the run measures learning, not memorization: the 330 s budget, then the evaluation.
    export DATA_PATH="$corpus/datasets/fineweb10B_sp$vocab" TOKENIZER_PATH="$corpus/tokenizers/fineweb_${vocab}_bpe.model"
    export DATA_LABEL="${DATA_LABEL:-embedded_docstring_corpus}"
    export NUM_LAYERS="${NUM_LAYERS:-6}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-4}"
    export NUM_KV_HEADS="${NUM_KV_HEADS:-2}" ROPE_DIMS="${ROPE_DIMS:-8}" XSA_LAST_N="${XSA_LAST_N:-2}"
    export BIGRAM_VOCAB_SIZE="${BIGRAM_VOCAB_SIZE:-2048}" BIGRAM_DIM="${BIGRAM_DIM:-64}" VE_DIM="${VE_DIM:-64}"
    export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-256}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-16384}"
    export MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-330}"
    # A cap as tight for this small model as 16,000,000 bytes is for the real one (at 1024 pieces all-int5 fits
    # with a few tens of KB to spare), so the run exercises the exporter's width decisions instead of making every
    # matrix int6. A larger vocabulary adds its rows of the two V-row tables (tied embedding 128 wide, value
    # embedding 64) at one byte per value: the real model's 16 MB is the same for every vocabulary, but at this
    # width the embedding would otherwise be most of the cap.
    export ARTIFACT_SIZE_CAP="${ARTIFACT_SIZE_CAP:-$(( 1050000 + (vocab - 1024) * 192 ))}"
    # EMA 0.9, not 0.99: at ~100 steps 0.99 still holds ~37% of the initial weights (0.02 BPB worse on 2 seeds x
    # 2 texts, logs/ema_embedded_20261126.txt); the submitted ~7,000-step run keeps the default 0.997.
    export WARMUP_STEPS="${WARMUP_STEPS:-2}" EMA_DECAY="${EMA_DECAY:-0.9}" SWA_EVERY="${SWA_EVERY:-10}"
    export MUON_MOMENTUM_WARMUP_STEPS="${MUON_MOMENTUM_WARMUP_STEPS:-100}"
    export VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-100}" TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}"
    export GPTQ_N_SAMPLES="${GPTQ_N_SAMPLES:-64}" GPTQ_BLOCK_SIZE="${GPTQ_BLOCK_SIZE:-64}"
    export EVAL_SEQ_LEN="${EVAL_SEQ_LEN:-256}" EVAL_STRIDE="${EVAL_STRIDE:-64}" EVAL_BATCH_SEQS="${EVAL_BATCH_SEQS:-16}"
    export TTT_CHUNK_TOKENS="${TTT_CHUNK_TOKENS:-4096}"
}

select_job() {
    # Sets `launch`: the submitted run under torchrun when there are CUDA GPUs and FineWeb shards,
    # otherwise the embedded corpus (built here) with the small configuration. Either way the script run is the
    # submitted form of train_gpt.py (tools/pack_code.py: the compressed self-extracting file the contest counts).
    "$python_bin" tools/pack_code.py --out build/train_gpt.py
    local script=build/train_gpt.py
    local data="${DATA_PATH:-./data/datasets/fineweb10B_sp$vocab}"
    if [ "$gpus" -gt 0 ] && ls "$data"/fineweb_train_*.bin >/dev/null 2>&1; then
        echo "run.sh: $gpus CUDA GPU(s) and FineWeb shards in $data: the submitted run on $nproc GPU(s)"
        launch="$python_bin -m torch.distributed.run --standalone --nproc_per_node=$nproc $script"
    else
        echo "run.sh: no CUDA GPU or no shards in $data: embedded corpus, small configuration"
        "$python_bin" tools/embedded_corpus.py --out "$corpus" --vocab-size "$vocab"
        embedded_settings
        launch="$python_bin $script"
    fi
}

case "$mode" in
    main)
        select_job
        export RUN_ID="${RUN_ID:-run_$(date +%Y%m%d_%H%M%S)}"
        log="${OUTPUT_DIR:-.}/logs/${RUN_ID}.txt"
        status=0
        $launch || status=$?
        # The report is drawn whatever happened (a failed run's curves are the first thing to look at).
        if [ -f "$log" ] && "$python_bin" -c "import matplotlib" 2>/dev/null; then
            "$python_bin" tools/report.py "$log" || true
        fi
        # The run's summary block comes last, so the end of the output reads as the result.
        if [ -f "$log" ]; then
            echo; sed -n '/^=* summary =*$/,$p' "$log"
            [ -f "${log%.txt}.png" ] && echo "report: ${log%.txt}.png"
        fi
        exit "$status" ;;
    test) exec "$python_bin" -m pytest -q -p no:cacheprovider tests ;;
    gpu-check) exec "$python_bin" tools/gpu_check.py "${@:2}" ;;
    seeds) select_job; exec "$python_bin" tools/seeds.py --launch "$launch" "${@:2}" ;;
    verify) exec "$python_bin" tools/verify.py --nproc "$nproc" --base-dir "$OLDPWD" "${@:2}" ;;
esac
