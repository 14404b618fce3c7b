#!/usr/bin/env bash
# Run several paper_repro.py jobs at once, one per GPU, on one machine (a device call with several GPUs).
#
#   experiments/on_gpus.sh OUT "ablations --only egmla-kv64-no-norm --steps 640" \
#       "latent --only egmla-kv64-latent --steps 640; table1 --only mla-kv16 --steps 640"
#
# Job i runs on GPU i (CUDA_VISIBLE_DEVICES=i); a job of several parts separated by ';' runs them one after
# another on that GPU. Job i writes its --out files to gpuI/ and its log to gpuI.log in a fresh $WORK/out.XXXX.
# All jobs share one --work folder ($WORK, default /tmp/egmla-repro): the tokenizer and token shards are built
# once, first, by `paper_repro.py --prepare-only` with the first part's arguments (parts with other data
# settings build their own). With $JOB_LIMIT_S (seconds from this script's start, building the corpus included;
# default: no limit) each part gets `--time-limit-s` for what is left: a run that would go past it stops at a
# checkpoint in $WORK, which the same call resumes (status 3: "call again"); a part still running at the limit
# is interrupted. The runs finished are kept. Identical jobs share a plan: each GPU takes the next run that no
# other holds (paper_repro.py's docstring).
# Everything is then packed into OUT/results.tar.gz (one file: a device call brings back at most 8) and each
# job's last lines are printed. Exits 1 if a job failed, else 3 if one stopped at its limit, else 0.
# $PYTHON (default python3) runs the jobs. Each job's tokens/s is measured beside the other jobs: separate
# GPUs, shared CPUs and host memory.
set -u
out=${1:?usage: on_gpus.sh OUT "GROUP ARGS..." ["GROUP ARGS..." ...]}
shift
[ $# -ge 1 ] || { echo "on_gpus.sh: no jobs given" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/egmla-repro}
python=${PYTHON:-python3}
mkdir -p "$work" "$out"
logs=$(mktemp -d "$work/out.XXXX")
deadline=$(( $(date +%s) + ${JOB_LIMIT_S:-0} ))
# shellcheck disable=SC2086  # each job's arguments are split on purpose
"$python" "$here/paper_repro.py" ${1%%;*} --work "$work" --prepare-only || exit 1
pids=()
for i in $(seq 0 $(($# - 1))); do
    job=${*:$((i + 1)):1}
    echo "gpu $i: paper_repro.py $job"
    IFS=';' read -ra parts <<< "$job"
    (
        export CUDA_VISIBLE_DEVICES=$i
        # shellcheck disable=SC2086
        for part in "${parts[@]}"; do
            limit=0
            if [ "${JOB_LIMIT_S:-0}" -gt 0 ]; then
                limit=$(( deadline - $(date +%s) ))
                [ "$limit" -gt 0 ] || { echo "on_gpus.sh: no time left for: $part"; exit 124; }
            fi
            budget=()
            [ "$limit" -gt 0 ] && budget=(--time-limit-s "$limit")
            timeout --signal=INT "$limit" "$python" "$here/paper_repro.py" $part "${budget[@]}" --work "$work" \
                --out "$logs/gpu$i" || exit
        done
    ) > "$logs/gpu$i.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "gpu $i: done"
    elif [ $rc -eq 3 ]; then
        echo "gpu $i: stopped at its time limit with runs left (the same call continues them)"
        [ $status -eq 1 ] || status=3
    else
        echo "gpu $i: FAILED or cut off (gpu$i.log)"; status=1
    fi
done
for i in "${!pids[@]}"; do
    echo "--- gpu $i: ${*:$((i + 1)):1}"
    grep -v "UserWarning: Mismatch dtype\|return node.target" "$logs/gpu$i.log" | tail -n 12
done
tar -czf "$out/results.tar.gz" -C "$logs" .
exit $status
