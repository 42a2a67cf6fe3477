#!/usr/bin/env bash
# bash bench/tree_slim.sh out|in, from the checkout's root.
# A device call takes the tracked tree plus what it carries, 64 MiB in all: with the results archives
# (bench/results/*/res.tgz) in the tree a 50 MiB model part no longer fits. `out` moves them into .device/tree-slim
# (git-ignored, never sent) before the part calls; `in` puts them back. skip-worktree keeps `git commit -a` from
# recording their absence as a deletion meanwhile.
set -eu
stash=.device/tree-slim
case ${1:-} in
out)
  for f in $(git ls-files 'bench/results/*/res.tgz'); do
    [ -f "$f" ] || continue
    git update-index --skip-worktree "$f"
    mkdir -p "$stash/$(dirname "$f")" && mv "$f" "$stash/$f"
  done ;;
in)
  for f in $(git ls-files 'bench/results/*/res.tgz'); do
    [ -f "$stash/$f" ] && mv "$stash/$f" "$f"
    git update-index --no-skip-worktree "$f"
  done ;;
*) echo "usage: bash bench/tree_slim.sh out|in" >&2; exit 2 ;;
esac
