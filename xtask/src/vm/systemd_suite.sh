#!/bin/bash
# The systemd VM suite, started by sentinel-vm-suite.service once multi-user.target is reached,
# from the run disk (with Sentinel's .deb). Each assertion listed in ./assertions is a function
# test_NAME below; its output and exit status go to the second serial port in the format
# report.rs reads, and the verdict to QEMU's debug-exit port (qemu.rs).

set -o pipefail
booted=$(cut -d ' ' -f 1 /proc/uptime)
SUITE_DIR=$(dirname "$0")
RESULTS=/dev/ttyS1
CONFIG=/etc/sentinel/sentinel.yaml
METRICS=http://127.0.0.1:9848/metrics
PROMETHEUS=http://127.0.0.1:9090

note() { echo "SENTINEL-NOTE $*"; }

# wait_for SECONDS COMMAND...: runs COMMAND once a second until it succeeds.
wait_for() {
    local seconds=$1
    shift
    until "$@"; do
        seconds=$((seconds - 1))
        [ $seconds -gt 0 ] || return 1
        sleep 1
    done
}

test_boot() {
    local state controllers controller
    state=$(systemctl is-system-running --wait)
    note "boot to multi-user.target: $booted s (guest uptime); system $state"
    systemd-analyze time
    controllers=$(cat /sys/fs/cgroup/cgroup.controllers)
    note "cgroup2 (unified) controllers: $controllers"
    for controller in cpu memory pids; do
        [[ " $controllers " == *" $controller "* ]] || {
            echo "the $controller controller is missing"
            return 1
        }
    done
    [ "$state" = running ] || {
        systemctl --failed --no-pager
        return 1
    }
}

test_install() {
    # Offline: nftables, Sentinel's one dependency, is in the image.
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$SUITE_DIR"/sentinel_*.deb
}

test_active() {
    local state
    state=$(systemctl is-active sentinel)
    systemctl show sentinel -p Type -p NotifyAccess -p MainPID -p ActiveEnterTimestamp
    echo "sentinel.service is $state"
    [ "$state" = active ] || return 1
    # The SSH guard's table exists while the daemon runs (purge must remove it).
    nft list table inet sentinel > /dev/null
}

test_metrics() {
    curl -sf "$METRICS" | grep '^sentinel_build_info'
}

# Every probe attaches with the unit's capabilities and sandbox.
test_probes() {
    local metrics
    metrics=$(curl -sf "$METRICS") || return 1
    grep '^sentinel_probe_attached' <<< "$metrics"
    ! grep -q '^sentinel_probe_attached{.*} 0$' <<< "$metrics"
}

test_exposure() {
    local report exposure
    report=$(systemd-analyze security --no-pager sentinel.service)
    # The settings that still count against the unit.
    grep '✗' <<< "$report"
    exposure=$(sed -n 's/.*Overall exposure level for sentinel.service: \([0-9.]*\).*/\1/p' \
        <<< "$report")
    note "systemd-analyze security sentinel.service: exposure ${exposure:-unreadable} (at most 4.0)"
    [ -n "$exposure" ] && awk "BEGIN { exit !($exposure <= 4.0) }"
}

test_reload_refused() {
    local before after state refused=yes
    before=$(systemctl show -p MainPID --value sentinel)
    cp "$CONFIG" /run/sentinel.yaml.good
    printf 'polices: []\n' > "$CONFIG"
    systemctl reload sentinel && refused=no
    cp /run/sentinel.yaml.good "$CONFIG"
    state=$(systemctl is-active sentinel)
    after=$(systemctl show -p MainPID --value sentinel)
    echo "reload of a broken file refused: $refused; then $state, main pid $before -> $after"
    journalctl -u sentinel --no-pager -n 4 -o cat
    [ $refused = yes ] && [ "$state" = active ] && [ "$before" = "$after" ] &&
        systemctl reload sentinel
}

sentinel_target_up() {
    local targets
    targets=$(curl -sf "$PROMETHEUS/api/v1/targets") || return 1
    grep -q '"job":"sentinel"' <<< "$targets" && grep -q '"health":"up"' <<< "$targets"
}

test_prometheus_scrapes() {
    # Waiting for a target that cannot come up would only delay the verdict.
    systemctl is-active --quiet sentinel || return 1
    cp /usr/share/sentinel/sentinel-scrape.yml /etc/prometheus/prometheus.yml
    systemctl restart prometheus || return 1
    # The first scrape comes within one scrape interval (15 s) of the start.
    wait_for 120 sentinel_target_up
    local up=$?
    curl -sf "$PROMETHEUS/api/v1/targets"
    echo
    curl -sf "$PROMETHEUS/api/v1/rules" | grep -o '"name":"SentinelDown"'
    return $up
}

test_purge() {
    local left=0 dir
    DEBIAN_FRONTEND=noninteractive apt-get purge -y sentinel || return 1
    if nft list table inet sentinel > /dev/null 2>&1; then
        echo "table inet sentinel is still there"
        left=1
    fi
    for dir in /var/lib/sentinel /var/log/sentinel /etc/sentinel; do
        if [ -e $dir ]; then
            echo "$dir is still there:"
            ls -la $dir
            left=1
        fi
    done
    return $left
}

failed=0
total=0
while read -r name; do
    total=$((total + 1))
    echo "SENTINEL-JOB-START $name" > $RESULTS
    started=$(cut -d ' ' -f 1 /proc/uptime)
    "test_$name" < /dev/null 2>&1 | tee -a $RESULTS
    status=$?
    if [ $status -ne 0 ]; then
        failed=$((failed + 1))
        echo "sentinel's journal:" | tee -a $RESULTS
        journalctl -u sentinel --no-pager -n 30 -o short-monotonic 2>&1 | tee -a $RESULTS
    fi
    seconds=$(awk "BEGIN { printf \"%.1f\", $(cut -d ' ' -f 1 /proc/uptime) - $started }")
    echo "SENTINEL-JOB-END $name status=$status seconds=$seconds" > $RESULTS
done < "$SUITE_DIR/assertions"

if [ $failed -eq 0 ] && [ $total -gt 0 ]; then
    echo "SENTINEL-VERDICT pass" > $RESULTS
    verdict='\020'
else
    echo "SENTINEL-VERDICT fail $failed of $total assertions failed" > $RESULTS
    verdict='\021'
fi
# QEMU exits during this write (qemu.rs turns the byte into the verdict).
printf "$verdict" | dd of=/dev/port bs=1 seek=244 count=1 2> /dev/null
systemctl poweroff --force
