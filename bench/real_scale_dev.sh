#!/usr/bin/env bash
# Issue 22's dev round on the GPU machine (seed 0, chosen on val), after `source bench/device_env.sh`, from /root/src.
#   bash bench/real_scale_dev.sh smollm2        # SmolLM2: probed lr vs the hand-picked 3e-4, activation-scaled z
#   bash bench/real_scale_dev.sh qwen           # Qwen2.5-Coder-1.5B (nf4): scan, noise and lr probes, the dev plan
#   bash bench/real_scale_dev.sh smollm2-boolq  # round 3, SmolLM2 BoolQ: longer, larger batch, eps 0.1 (plan in bench/plans)
#   bash bench/real_scale_dev.sh qwen-round3    # round 3, Qwen nf4: final probe rule + guard, eps, layer, references
#   bash bench/real_scale_dev.sh final [TASK..] # issue 22's evidence: the final plan, 3 seeds, and zero-shot test
#                                               # (default tasks: sst2 rte), and the leading candidates, 3 seeds
#   bash bench/real_scale_dev.sh final-recipe TASK..  # zero-shot, the plan's `zolite` and backprop arms and the
#                                               # candidate layers, 3 seeds (BoolQ: ~5x a step, so its own runs first)
#   bash bench/real_scale_dev.sh final-short    # a short lease: BoolQ's final-recipe, RTE's plain MeZO to its end, then
#                                               # RTE's layer 27 and eps 1e-3 (fewer runs side by side: BoolQ first)
#   JOBS=5 bash bench/real_scale_dev.sh boolq-candidates   # BoolQ's fewer-weights candidates only (seed 0, val)
#   bash bench/real_scale_dev.sh boolq-next     # after the third part: BoolQ's fewer-weights candidates, plain MeZO,
#                                               # backprop's other seeds; RTE's layer 27 and eps 1e-3
#   bash bench/real_scale_dev.sh bitfit-boolq   # after the fourth part: biases and norms over nf4, BoolQ 3 seeds alone
#   bash bench/real_scale_dev.sh bitfit-next    # after the fourth part: biases and norms over nf4, BoolQ 3 seeds
#                                               # and plain MeZO on them, SST-2 and RTE at lr 1e-3 (seed 0)
#   bash bench/real_scale_dev.sh bitfit-refs    # after the fifth part: its references on BoolQ (plain MeZO, fp16,
#                                               # backprop into the same weights), 3 seeds each, 5 side by side
#   bash bench/real_scale_dev.sh boolq-late     # after the sixth part: BoolQ's recipe with activation-scaled z on
#                                               # its norms (two lrs), the layers after the read-out's peak
#                                               # (bitfit-late: two lrs; layer18), seed 0, on val
#   bash bench/real_scale_dev.sh boolq-act      # after the seventh part: bitfit-nf4-act's seeds 1-2 (lr 3e-3), and
#                                               # seed 0 of the unscaled recipe at 3e-3 and the scaled one at 1e-2
#                                               # and at the probed lr
#   bash bench/real_scale_dev.sh mezo-full [TASK..]  # full-model MeZO (fp16), $SEEDS (3) seeds side by side
#                                               # (default task: sst2)
#   bash bench/real_scale_dev.sh rows-next      # after the eighth part: SST-2's and RTE's recipes on the fp16 base,
#                                               # then SST-2's layer-27 references (plain MeZO, backprop), 3 seeds
#   bash bench/real_scale_dev.sh boolq-long     # the scaled BoolQ recipe for 4,000 steps ($SEEDS seeds, default 3)
#   bash bench/real_scale_dev.sh speed          # the ZO arms' ms/step alone on the GPU (bench/step_speed.py, Qwen
#                                               # on BoolQ; ~3 min, in the foreground: before any run starts)
#   bash bench/real_scale_dev.sh speed-profile  # after the tenth part: where the step on BoolQ's recipe weights and on
#                                               # the full model spends its time (torch.profiler), the recipe's
#                                               # step under --cuda-graphs, backprop's step (~3 min, foreground)
#   bash bench/real_scale_dev.sh speed-next     # after the eleventh part: the recipe's step again (eager, graphed),
#                                               # 3 profiled full-model steps, backprop on layers 1 / 27 (~4 min,
#                                               # foreground)
#   bash bench/real_scale_dev.sh boolq-graphs   # BoolQ's recipe under --cuda-graphs, seed 0
#   bash bench/real_scale_dev.sh boolq-decay    # BoolQ's recipe with --lr-schedule linear, 3 seeds
#   bash bench/real_scale_dev.sh refs-next      # bitfit-refs and mezo-full sst2
#   bash bench/real_scale_dev.sh probe-qwen     # Qwen BoolQ (nf4): what a linear read-out of each layer reaches, and
#                                               # ZO on the final norm replayed (bench/probe_ceiling.py; ~2 min GPU)
#   bash bench/real_scale_dev.sh smollm2-norms  # SmolLM2 BoolQ on every layer's norms (seed 0, four lrs; and
#                                               # activation-scaled at 3e-4, 1e-3, 3e-3)
#   bash bench/real_scale_dev.sh smollm2-long   # SmolLM2 BoolQ for 10,000 steps (layer 11, every norm; seed 0)
#   bash bench/real_scale_dev.sh collect DIR    # tables so far, reports and seed checkpoints -> DIR (the $OUT)
#   bash bench/real_scale_dev.sh watch S DIR    # wait S seconds, collect into DIR, print the logs' last lines: the
#                                               # waiting call, repeated (a machine taken back loses at most S)
#   bash bench/real_scale_dev.sh stop           # end the background jobs (a call's own command line must not
#                                               # name them: pkill -f would match the call's shell)
# Jobs run in the background (setsid): they outlive the call that started them while the machine stays warm.
# Re-running a start resumes (finished runs are read back, cut-off ones continue from their seed checkpoints).
set -u
case ${1:-} in
collect|watch|stop) ;;
*) # a start without the device's environment fails to find the models, and the call then sleeps for nothing
   [ -n "${ZOLITE_CACHE:-}" ] || { echo "real_scale_dev.sh: source bench/device_env.sh first (from the checkout's root, in the same call)" >&2; exit 1; } ;;
esac
R=/root/res
mkdir -p $R
convert_once() {   # join (SHA-256) and convert a model's GGUF once, before runs start side by side (each would, racing)
  python3 -c "from zolite.loading import resolve_model; print(resolve_model('$1')[0])" || exit 1
}
qwen_once() { convert_once qwen2.5-coder-1.5b; }
boolq_arm() {   # ARM SEEDS NAME: an arm of bench/plans/real_scale_candidates.toml on BoolQ, its seeds side by side,
                # into $R/final/NAME (log $R/NAME.log)
  qwen_once
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms $1 --seeds $2 --jobs $2 --data /root/data --out $R/final/$3 --quiet > $R/$3.log 2>&1 < /dev/null &
}
case $1 in
smollm2)
  for t in sst2 boolq; do
    setsid nohup zolite ablate --model smollm2-135m --task $t --plan bench/plans/smollm2_auto_lr.toml --seeds 1 \
      --steps 1000 --jobs 3 --data /root/data --out $R/smollm2b/$t --quiet > $R/smollm2b-$t.log 2>&1 < /dev/null &
  done ;;
qwen)
  [ -f $R/scan-qwen/report.json ] || zolite scan --model qwen2.5-coder-1.5b --out $R/scan-qwen --force > $R/scan-qwen.log 2>&1
  [ -f $R/noise-qwen.log ] || setsid nohup python bench/quant_noise_probe.py --model qwen2.5-coder-1.5b --layer 1 --reference-dtype float32 \
    --modes reference,"fp16 float16","fp16 bfloat16","nf4 float16","nf4 bfloat16" --eps 1e-3,1e-2 \
    --out $R/noise-qwen > $R/noise-qwen.log 2>&1 < /dev/null &
  [ -f $R/lr-probe-qwen.log ] || setsid nohup python bench/lr_probe.py --model qwen2.5-coder-1.5b --task boolq --layers 1,4,14,27 --mode nf4 \
    --data /root/data --out $R/lr-probe-qwen-boolq.json > $R/lr-probe-qwen.log 2>&1 < /dev/null &
  for t in sst2 boolq rte; do
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_dev.toml --seeds 1 \
      --steps 1000 --jobs 4 --data /root/data --out $R/qwen2/$t --quiet > $R/qwen2-$t.log 2>&1 < /dev/null &
  done ;;
smollm2-boolq)
  convert_once smollm2-135m
  setsid nohup zolite ablate --model smollm2-135m --task boolq --plan bench/plans/smollm2_boolq.toml --seeds 1 \
    --steps 1000 --jobs 4 --data /root/data --out $R/smollm2-r3/boolq --quiet > $R/smollm2-r3-boolq.log 2>&1 < /dev/null & ;;
qwen-round3)
  qwen_once
  for t in sst2 boolq rte; do
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_round3.toml --seeds 1 \
      --steps 2000 --jobs 6 --data /root/data --out $R/qwen3/$t --quiet > $R/qwen3-$t.log 2>&1 < /dev/null &
  done
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task sst2 --plan bench/plans/real_scale_round3_sst2.toml \
    --seeds 1 --steps 2000 --jobs 1 --data /root/data --out $R/qwen3/sst2-normbias --quiet \
    > $R/qwen3-sst2-normbias.log 2>&1 < /dev/null & ;;
final|final-recipe)
  # issue 22's evidence (bench/plans/real_scale_final.toml), 3 seeds, on the tasks given (default sst2 rte; boolq
  # costs ~5x a step); beside them, zero-shot on test (nf4: every layer quantized, as a user's plain nf4 model; the
  # runs keep their layer in fp16)
  verb=$1; shift
  qwen_once
  tasks=${*:-sst2 rte}
  mkdir -p $R/final
  # zero-shot: tried again every 30 s while the GPU is full (RTE's fp16 scoring ran out of memory beside 16 runs)
  setsid nohup bash -c "for t in $tasks; do for m in nf4 fp16; do f=$R/final/zero-shot-\$t-\$m.json
    for try in 1 2 3 4 5 6 7 8 9 10; do [ -f \$f ] && break
      zolite eval --model qwen2.5-coder-1.5b --task \$t --split test --mode \$m --data /root/data --json \
        > \$f.part && mv \$f.part \$f || sleep 30; done; done; done" > $R/final-zero-shot-${tasks// /-}.log 2>&1 \
    < /dev/null &
  for t in $tasks; do
    # the candidates (bench/plans/real_scale_candidates.toml), 3 seeds: SST-2's dev leaders (layer 27 won at 3 seeds);
    # RTE's leader layer 4, SST-2's layer 27 and eps 1e-3 (plain MeZO's gain on RTE); BoolQ's layer 27 and eps 1e-3.
    # Finished runs are read back.
    arms=$(case $t in sst2) echo layer27,sparse ;; rte) echo eps1e-3,layer27,layer4 ;; *) echo layer27,eps1e-3 ;; esac)
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_candidates.toml \
      --arms $arms --seeds 3 --jobs 2 --data /root/data --out $R/final/$t-candidates --quiet \
      > $R/final-$t-candidates.log 2>&1 < /dev/null &
    # backprop in its own process, started at once: its dense checkpoints are not collected, so a cut-off backprop
    # run starts over next session; the ZO arms' seed checkpoints resume (zolite ablate --table-only tabulates them).
    # final-recipe runs one at a time (BoolQ's: is +3 points reachable on layer 1 at all?)
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_final.toml \
      --arms backprop --seeds 3 --jobs $([ $verb = final-recipe ] && echo 1 || echo 3) --data /root/data \
      --out $R/final/$t --quiet > $R/final-$t-backprop.log 2>&1 < /dev/null &
    if [ $verb = final-recipe ]; then
      setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_final.toml \
        --arms zolite --seeds 3 --jobs 3 --data /root/data --out $R/final/$t --quiet \
        > $R/final-$t.log 2>&1 < /dev/null &
      continue
    fi
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_final.toml \
      --arms zolite,mezo,mezo-full,zolite-fp16 --seeds 3 --jobs 3 --data /root/data --out $R/final/$t --quiet \
      > $R/final-$t.log 2>&1 < /dev/null &
  done ;;
final-short)
  bash $0 final-recipe boolq
  setsid nohup bash -c "zolite ablate --model qwen2.5-coder-1.5b --task rte --plan bench/plans/real_scale_final.toml \
      --arms mezo --seeds 3 --jobs 3 --data /root/data --out $R/final/rte --quiet
    zolite ablate --model qwen2.5-coder-1.5b --task rte --plan bench/plans/real_scale_candidates.toml \
      --arms layer27,eps1e-3 --seeds 3 --jobs 3 --data /root/data --out $R/final/rte-candidates --quiet" \
    > $R/final-rte-short.log 2>&1 < /dev/null & ;;
boolq-candidates)
  # BoolQ's fewer-weights candidates and eps 1e-3, seed 0, judged on val: all five runs side by side (JOBS=5) when
  # they have the GPU to themselves, 3 at a time beside other runs
  qwen_once
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms vod,bitfit,bitfit-lr,eps1e-3 --seeds 1 --jobs ${JOBS:-3} --data /root/data \
    --out $R/final/boolq-candidates --quiet > $R/boolq-next-candidates.log 2>&1 < /dev/null & ;;
boolq-next)
  # after the third part: BoolQ's candidates (above), plain MeZO on layer 1 (the reference row, 3 seeds) and the
  # rest of backprop's seeds; RTE's layer 27 (resumes) and eps 1e-3
  bash "$0" boolq-candidates
  setsid nohup bash -c "zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_final.toml \
      --arms mezo,zolite --seeds 3 --jobs 3 --data /root/data --out $R/final/boolq --quiet
    zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_final.toml \
      --arms backprop --seeds 3 --jobs 1 --data /root/data --out $R/final/boolq --quiet" \
    > $R/boolq-next.log 2>&1 < /dev/null &
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task rte --plan bench/plans/real_scale_candidates.toml \
    --arms layer27,eps1e-3 --seeds 3 --jobs 3 --data /root/data --out $R/final/rte-candidates --quiet \
    > $R/rte-next.log 2>&1 < /dev/null & ;;
bitfit-boolq)
  # after the fourth part: every layer's biases and norms over an nf4 base, BoolQ's 3 seeds at lr 1e-3 (chosen on
  # val in the fourth part: the target's evidence), alone (a short lease)
  qwen_once
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms ${ARMS:-bitfit-nf4} --seeds 3 --jobs ${JOBS:-3} --data /root/data --out $R/final/boolq-candidates --quiet \
    > $R/bitfit-boolq.log 2>&1 < /dev/null & ;;
bitfit-next)
  # the same beside its plain-MeZO reference (eps 1e-3, no guard; its seeds 1-2 start as the others end), and SST-2
  # and RTE at lr 1e-3 (seed 0, val). The probed lr is left out: on these weights the curvature has no usable mean
  # (docs/evidence.md) and the probe's fallback lost on BoolQ (part 4)
  ARMS=bitfit-nf4,bitfit-nf4-mezo JOBS=4 bash "$0" bitfit-boolq
  for t in sst2 rte; do
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_candidates.toml \
      --arms bitfit-nf4 --seeds 1 --jobs 1 --data /root/data --out $R/final/$t-candidates --quiet \
      > $R/bitfit-$t.log 2>&1 < /dev/null &
  done ;;
bitfit-refs)
  # after the fifth part: bitfit-nf4's references on BoolQ, 3 seeds each: plain MeZO on the same tensors, the same
  # recipe in fp16 (`bitfit-lr`: seed 0's grid ran in the fourth part, so seeds 1-2 at its 1e-3), backprop into them
  ARMS=bitfit-nf4-mezo,bitfit-lr,bitfit-nf4-backprop JOBS=${JOBS:-5} bash "$0" bitfit-boolq ;;
boolq-late)
  # BoolQ's recipe with the norms' z scaled (bitfit-nf4-act), and the layers that would carry layer 18's read-out
  # to the answer (bench/results/probe_ceiling_qwen_h100); seed 0
  qwen_once
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms bitfit-nf4-act,bitfit-late,layer18 --seeds 1 --jobs 5 --data /root/data --out $R/final/boolq-late --quiet \
    > $R/boolq-late.log 2>&1 < /dev/null & ;;
boolq-act)
  # after the seventh part: the scaled recipe's seeds 1-2 at its picked lr (3e-3), beside seed 0 of three controls:
  # the unscaled recipe at 3e-3 (the scaling or the step?), the scaled one at 1e-2 (the grid's edge) and at the
  # probed lr (no grid)
  qwen_once
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms bitfit-nf4-act --seeds 3 --jobs 2 --data /root/data --out $R/final/boolq-late --quiet \
    > $R/boolq-act.log 2>&1 < /dev/null &
  setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task boolq --plan bench/plans/real_scale_candidates.toml \
    --arms bitfit-nf4-3e-3,bitfit-nf4-act-1e-2,bitfit-nf4-act-auto --seeds 1 --jobs 3 --data /root/data \
    --out $R/final/boolq-act --quiet > $R/boolq-act-controls.log 2>&1 < /dev/null & ;;
mezo-full)
  # the row every task still lacks: full-model MeZO (the final plan's `mezo-full`, fp16), 3 seeds, on the tasks given
  # (default sst2: its rows are the shortest, ~5x fewer tokens a step than BoolQ's)
  shift; qwen_once
  for t in ${*:-sst2}; do
    setsid nohup zolite ablate --model qwen2.5-coder-1.5b --task $t --plan bench/plans/real_scale_final.toml \
      --arms mezo-full --seeds ${SEEDS:-3} --jobs ${SEEDS:-3} --data /root/data --out $R/final/$t --quiet \
      > $R/mezo-full-$t.log 2>&1 < /dev/null &
  done ;;
rows-next)
  # after the eighth part: the matrix's empty cells (bench/real_scale_matrix.py), one ablation after another so at
  # most 3 more processes share the GPU: SST-2's recipe (layer 27) and RTE's (eps 1e-3, no guard) on the fp16 base,
  # then plain MeZO and backprop on SST-2's layer 27; 3 seeds each
  qwen_once
  ab="zolite ablate --model qwen2.5-coder-1.5b --plan bench/plans/real_scale_candidates.toml --seeds 3 --jobs 3 --data /root/data --quiet"
  setsid nohup bash -c "$ab --task sst2 --arms layer27-fp16 --out $R/final/sst2-fp16
    $ab --task rte --arms eps1e-3-noguard-fp16 --out $R/final/rte-fp16
    $ab --task sst2 --arms layer27-mezo,layer27-backprop --out $R/final/sst2-layer27-refs" \
    > $R/rows-next.log 2>&1 < /dev/null & ;;
boolq-long)
  # after the ninth part: the scaled BoolQ recipe (0.2 points short of its target) for 4,000 steps ($SEEDS seeds,
  # default 3), resumed over sessions
  boolq_arm bitfit-nf4-act-long ${SEEDS:-3} boolq-long ;;
boolq-decay)
  # after the twelfth part: BoolQ's recipe with its lr decaying linearly to 0 over its 2,000 steps, 3 seeds
  boolq_arm bitfit-nf4-act-linear 3 boolq-decay ;;
speed)
  # the matrix's times come from runs sharing the GPU; these are speeds: each ZO arm's step, eager MeZO and the
  # forward floor on the same BoolQ batch, alone on the GPU
  qwen_once
  python bench/step_speed.py --out $R/speed --data /root/data --steps 20 --warmup 3 --rounds 2 --step-samples 3 \
    --only zolite-bare,eager,floor-2x,floor-2b --configs qwen-L1-nf4,qwen-L27-nf4,qwen-bitfit-nf4,qwen-all-fp16 \
    > $R/speed.log 2>&1; grep -h '^| qwen-' $R/speed/results.md ;;
speed-profile)
  # the tenth part: zolite's step was 1.23x eager MeZO on every bias and norm and 1.79x on the full model (fp16);
  # which operations take the difference (torch.profiler's tables: $R/speed-profile/*/profile-*-zolite-bare.txt),
  # and do CUDA graphs remove the recipe's launches?
  qwen_once
  # Also backprop's step (the matrix's ceiling rows) on layers 1 and 27 and on the recipe's weights.
  sp() { python bench/step_speed.py --data /root/data --steps 10 --warmup 3 --rounds 1 --step-samples 3 "$@"; }
  sp --out $R/speed-profile/bitfit --only zolite-bare,graphs-bare,eager,floor-2b,backprop \
    --configs qwen-bitfit-nf4 --profile zolite-bare > $R/speed-profile-bitfit.log 2>&1
  sp --out $R/speed-profile/full --only zolite-bare,eager,floor-2b --configs qwen-all-fp16 --profile zolite-bare \
    > $R/speed-profile-full.log 2>&1
  sp --out $R/speed-profile/layers --only zolite-bare,backprop --configs qwen-L1-nf4,qwen-L27-nf4 \
    > $R/speed-profile-layers.log 2>&1
  grep -h '^| qwen-' $R/speed-profile/*/results.md ;;
speed-next)
  # the eleventh part: speed-profile ran past its 300 s after its first bench. Alone on the GPU, ~4 min: BoolQ's
  # recipe weights since their 4-bit q/k/v run once on the doubled batch and their 140 tensors are stepped together
  # (zolite, graphed, eager, floor; beside zolite before that, /root/zolite-prev, where the call copied
  # .device/zolite-prev), 3 profiled steps of the full model (fp16: where the 1.79x of eager MeZO goes), backprop's
  # step on layers 1 and 27
  qwen_once
  sp() { python bench/step_speed.py --data /root/data --warmup 3 --step-samples 3 "$@"; }
  prev=""; [ -d /root/zolite-prev/zolite ] && prev="--baseline /root/zolite-prev"
  sp --out $R/speed-next/bitfit --steps 20 --rounds 2 --only zolite-bare,base-bare,graphs-bare,eager,floor-2b \
    --configs qwen-bitfit-nf4 $prev > $R/speed-next-bitfit.log 2>&1
  sp --out $R/speed-next/full --steps 5 --rounds 1 --only zolite-bare,eager,floor-2b --configs qwen-all-fp16 \
    --profile zolite-bare --profile-steps 3 > $R/speed-next-full.log 2>&1
  sp --out $R/speed-next/layers --steps 10 --rounds 1 --only zolite-bare,backprop --configs qwen-L1-nf4,qwen-L27-nf4 \
    > $R/speed-next-layers.log 2>&1
  grep -h '^| qwen-' $R/speed-next/*/results.md ;;
boolq-graphs)
  # after the eleventh part: BoolQ's recipe under CUDA graphs, seed 0 (bench/plans/real_scale_candidates.toml)
  boolq_arm bitfit-nf4-act-graphs 1 boolq-graphs ;;
refs-next)
  # bitfit-refs beside full-model MeZO on SST-2
  bash "$0" bitfit-refs && bash "$0" mezo-full sst2 ;;
probe-qwen)
  # the read-out ceiling of bench/results/probe_ceiling_cpu, on Qwen: are BoolQ's answers in its states already?
  qwen_once
  setsid nohup bash -c "python bench/probe_features.py --model qwen2.5-coder-1.5b --task boolq --data /root/data \
    --out /tmp/probe-qwen && python bench/probe_ceiling.py --features /tmp/probe-qwen/features.pt --out $R/probe-qwen \
    && cp /tmp/probe-qwen/meta.json $R/probe-qwen/" > $R/probe-qwen.log 2>&1 < /dev/null & ;;
smollm2-long)
  # SmolLM2 BoolQ at 10x the steps (bench/plans/smollm2_boolq_long.toml), seed 0, on val (smollm2-norms is done:
  # docs/evidence.md, eighth part)
  convert_once smollm2-135m
  setsid nohup zolite ablate --model smollm2-135m --task boolq --plan bench/plans/smollm2_boolq_long.toml \
    --seeds 1 --jobs 2 --data /root/data --out $R/smollm2-long/boolq --quiet > $R/smollm2-long.log 2>&1 < /dev/null & ;;
smollm2-norms)
  # once SmolLM2 is there: BoolQ on every layer's norms (bench/plans/smollm2_boolq_norms.toml), seed 0, on val
  convert_once smollm2-135m
  setsid nohup zolite ablate --model smollm2-135m --task boolq --plan bench/plans/smollm2_boolq_norms.toml \
    --seeds 1 --jobs 4 --data /root/data --out $R/smollm2-norms/boolq --quiet > $R/smollm2-norms.log 2>&1 < /dev/null & ;;
stop)
  pkill -f "zolite ablate"; pkill -f "zolite eval"; pkill -f "multiprocessing.spawn"; sleep 4
  pkill -9 -f "zolite ablate"; pkill -9 -f "zolite eval"; pkill -9 -f "multiprocessing.spawn"; true ;;
collect)
  out=$2
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv > $R/nvidia-smi.txt
  uptime >> $R/nvidia-smi.txt   # the load average: are the runs bound by the host's cores together?
  # everything but weights: reports, tables, logs, seed checkpoints (kilobytes; dense ones are skipped)
  find $R -name '*.safetensors' -size +16M | sed 's|^/||' > /tmp/big.txt
  tar czf $out/res.tgz -X /tmp/big.txt --exclude='patch.safetensors' -C / root/res
  ls -la $out ;;
watch)
  sleep $2
  # the logs written since the last collect (its nvidia-smi.txt): -mmin also matched every log the start carried in
  new=$(find $R -maxdepth 1 -name '*.log' -newer $R/nvidia-smi.txt 2>/dev/null || find $R -maxdepth 1 -name '*.log')
  bash "$0" collect $3
  cat $R/nvidia-smi.txt
  for f in $new; do echo "== $f"; tail -c 300 $f; echo; done ;;
esac
