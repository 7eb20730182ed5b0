#!/bin/sh
# PID 1 of the vm-test guest (busybox sh). Prepares what the privileged suites
# need (cgroup v2 controllers, bpffs, tracefs, nftables modules, loopback),
# runs each job of /sentinel/jobs, writes the results to the second serial port
# and stops QEMU through its isa-debug-exit device.

# Bytes for port 0xf4; QEMU then exits with status (byte << 1) | 1.
# Keep in sync with qemu.rs.
VERDICT_PASS='\020'   # QEMU exit status 33
VERDICT_FAIL='\021'   # 35
VERDICT_SETUP='\022'  # 37

RESULTS=/dev/ttyS1
CGROUP_ROOT=/sys/fs/cgroup
CONTROLLERS="cpu memory pids io"

export PATH=/sentinel/bin:/sentinel/payload:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export SENTINEL_IN_VM=1 SENTINEL_BIN=/sentinel/bin/sentinel
# Children of SENTINEL_CGROUP_ROOT get the controllers above; the jobs
# themselves run in SENTINEL_JOB_CGROUP.
export SENTINEL_CGROUP_ROOT=$CGROUP_ROOT
export SENTINEL_JOB_CGROUP=$CGROUP_ROOT/init.scope

say() { echo "sentinel-init: $*"; }

uptime_seconds() { read -r seconds _ < /proc/uptime; echo "$seconds"; }

stop_vm() {
    # QEMU exits during this write; the lines after it only run if it did not,
    # and the host then reports a missing verdict.
    printf "$1" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    say "writing the verdict to I/O port 0xf4 did not stop QEMU; powering off"
    poweroff -f
}

setup_failed() {
    say "SETUP FAILED: $*"
    echo "SENTINEL-VERDICT setup-failed $*" > $RESULTS
    stop_vm "$VERDICT_SETUP"
}

# The root filesystem is already a writable tmpfs: /tmp and /run stay part of
# it, so payload files under a /tmp path (a build dir there) remain visible.
mount_fs() {  # type, directory
    mkdir -p "$2" && mount -t "$1" "$1" "$2" || setup_failed "cannot mount $1 on $2"
}

mount_fs devtmpfs /dev
mount_fs proc /proc
mount_fs sysfs /sys
mount_fs devpts /dev/pts
mount_fs tmpfs /dev/shm
mount_fs cgroup2 $CGROUP_ROOT
mount_fs bpf /sys/fs/bpf
mount_fs tracefs /sys/kernel/tracing
mount_fs debugfs /sys/kernel/debug
say "kernel $(uname -r) reached /init after $(uptime_seconds) s"

# A cgroup with processes cannot give controllers to its children, so init
# leaves the root cgroup first (the root itself is exempt, the jobs' own
# cgroups will not be).
mkdir $SENTINEL_JOB_CGROUP && echo $$ > $SENTINEL_JOB_CGROUP/cgroup.procs ||
    setup_failed "cannot move init into $SENTINEL_JOB_CGROUP"
for controller in $CONTROLLERS; do
    echo "+$controller" > $CGROUP_ROOT/cgroup.subtree_control ||
        setup_failed "cannot enable the $controller controller for children of $CGROUP_ROOT"
done
say "cgroup2 controllers: $(cat $CGROUP_ROOT/cgroup.controllers)"
say "enabled for children of $CGROUP_ROOT: $(cat $CGROUP_ROOT/cgroup.subtree_control)"

while read -r module; do
    modprobe "$module" || setup_failed "cannot load kernel module $module"
done < /etc/sentinel/modules-preload
say "modules loaded: $(cut -d ' ' -f 1 /proc/modules | tr '\n' ' ')"

ip link set lo up || setup_failed "cannot bring up the loopback interface"

if grep -qw sentinel.shell /proc/cmdline; then
    say "debug shell: leave it with exit (or Ctrl-A x); the jobs are in /sentinel/jobs"
    say "this shell prefers busybox applets: run /sbin/ip for iproute2's ip (netns)"
    setsid cttyhack sh -l
    stop_vm "$VERDICT_PASS"
fi

# A job's status is its command's, not tee's.
set -o pipefail
tab=$(printf '\t')
jobs=0
failed=0
while IFS="$tab" read -r name command; do
    jobs=$((jobs + 1))
    say "job $name: $command"
    echo "SENTINEL-JOB-START $name" > $RESULTS
    started=$(uptime_seconds)
    sh -c "$command" < /dev/null 2>&1 | tee -a $RESULTS
    status=$?
    seconds=$(awk "BEGIN { printf \"%.1f\", $(uptime_seconds) - $started }")
    echo "SENTINEL-JOB-END $name status=$status seconds=$seconds" > $RESULTS
    say "job $name: exit status $status after $seconds s"
    [ $status -eq 0 ] || failed=$((failed + 1))
done < /sentinel/jobs
[ $jobs -gt 0 ] || setup_failed "/sentinel/jobs lists no job"

# The whole kernel log, for post-mortems (the console only shows warnings).
echo "SENTINEL-DMESG-START" > $RESULTS
dmesg > $RESULTS
echo "SENTINEL-DMESG-END" > $RESULTS

if [ $failed -eq 0 ]; then
    echo "SENTINEL-VERDICT pass" > $RESULTS
    stop_vm "$VERDICT_PASS"
else
    echo "SENTINEL-VERDICT fail $failed of $jobs jobs failed" > $RESULTS
    stop_vm "$VERDICT_FAIL"
fi
