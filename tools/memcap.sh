#!/usr/bin/env bash
# memcap.sh LIMIT_MB CMD...: run CMD in a memory cgroup of its own capped at LIMIT_MB (swap
# included where the kernel allows), then print `rc=N maxusage_mb=M failcnt=F` as the last line:
# CMD's exit status, the cgroup's peak usage and how often it hit the cap (cgroup v1: failcnt;
# v2: memory.events "max"). Used by tools/bench_merge.py and tools/bench_70b.py --memcap.
# Needs write access to this process's memory cgroup (root in a container, or a delegated one).
set -u
[ $# -ge 2 ] || { echo "usage: memcap.sh LIMIT_MB CMD..." >&2; exit 2; }
limit=$(($1 * 1024 * 1024)); shift
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then        # cgroup v2: one unified hierarchy
    v=2; parent="/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)"
else                                                     # cgroup v1: the memory controller's tree
    v=1; parent="/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup)"
fi
cg="$parent/memcap.$$"
mkdir "$cg" || { echo "error: memcap.sh: cannot create a cgroup under $parent" >&2; exit 3; }
if [ $v = 2 ]; then
    echo "$limit" >"$cg/memory.max"
    echo 0 >"$cg/memory.swap.max" 2>/dev/null
else
    echo "$limit" >"$cg/memory.limit_in_bytes"
    echo "$limit" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null
fi
# The subshell moves itself into the cgroup, then becomes CMD: only CMD and its children count.
(echo "$BASHPID" >"$cg/cgroup.procs" && exec "$@"); rc=$?
if [ $v = 2 ]; then
    peak=$(cat "$cg/memory.peak" 2>/dev/null || echo 0)
    hits=$(awk '$1 == "max" {print $2}' "$cg/memory.events")
else
    peak=$(cat "$cg/memory.max_usage_in_bytes"); hits=$(cat "$cg/memory.failcnt")
fi
sleep 0.2   # the cgroup can be removed only once its last process has left
rmdir "$cg" 2>/dev/null
echo "rc=$rc maxusage_mb=$((peak / 1048576)) failcnt=$hits"
exit "$rc"
