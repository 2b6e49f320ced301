#!/usr/bin/env bash
# Run a reproduction preset for at most SECONDS, then pack what a later run resumes from.
#
#     scripts/run_preset_within.sh PRESET SECONDS PACK_DIR [reproduce options...]
#
# For a machine that is lent for a fixed time (a GPU held for minutes): `advdefense
# reproduce --preset PRESET` runs until it finishes or SECONDS pass, then PACK_DIR gets
#   zoo.tar.gz.*    the zoo entries of this preset (weights, config, evaluation: every finished
#                   entry; commit them, and `reproduce` reuses them without training again);
#   runs.tar.gz.*   the run folder without the checkpoints of entries already in the zoo (the
#                   unfinished entries' last.pt, their logs), in parts of at most 15 MB;
#   reproduce.log   the console output.
# Unpack both archives in the repository root of another machine and run the same
# `advdefense reproduce --preset PRESET` there: it resumes every unfinished entry at its last
# epoch and evaluation. Needs Python with torch; runs the package from src/ when it is not
# installed.
set -u
preset=$1 seconds=$2 pack=$3
shift 3
mkdir -p "$pack"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the commit of a checkout that travelled without .git: set ADVDEFENSE_COMMIT before the call
timeout --signal=INT --kill-after=20 "$seconds" \
    python3 -m advdefense reproduce --preset "$preset" --no-progress "$@" \
    >"$pack/reproduce.log" 2>&1
echo "reproduce exit code $? after at most $seconds s" >>"$pack/reproduce.log"
run="runs/reproduce_$preset"
if [ -d "zoo/$preset" ]; then
    tar czf - "zoo/$preset" | split -b 15M - "$pack/zoo.tar.gz."
fi
if [ -d "$run" ]; then
    # an entry with an evaluation is in the zoo: its checkpoints need not travel
    excludes=()
    for done in "$run"/*/evaluation.json; do
        [ -e "$done" ] || continue
        excludes+=(--exclude="$(dirname "$done")/*.pt")
    done
    tar czf - "${excludes[@]}" "$run" | split -b 15M - "$pack/runs.tar.gz."
fi
ls -l "$pack"
