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
# What the suite keeps between assertions (the run disk is read-only).
KEPT=/run/sentinel-suite-kept
CONTROL=/run/systemd/system.control
NGINX_CGROUP=/sys/fs/cgroup/system.slice/nginx.service
LIMITS="-p MemoryMax -p MemoryHigh -p CPUQuotaPerSecUSec -p CPUWeight -p TasksMax"
# The web policy's limits, as `systemctl show` and the cgroup files report them.
NGINX_SHOWN="CPUQuotaPerSecUSec=500ms CPUWeight=200 MemoryHigh=209715200 MemoryMax=268435456 TasksMax=64"
NGINX_FILES="268435456 209715200 50000 100000 200 64"
# A unit that starts only once Sentinel runs, matched by a glob policy, and its limits.
LATE=sentinel-late-worker.service
LATE_CGROUP=/sys/fs/cgroup/system.slice/$LATE
LATE_SHOWN="MemoryMax=100663296 TasksMax=16"
LATE_FILES="100663296 16"

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

# The policies the unit assertions use, replacing the shipped file's observe-only ones.
POLICIES='policies:
  - name: web
    unit: nginx.service
    memory.max: 256M
    memory.high: 200M
    cpu.max: 50%
    cpu.weight: 200
    pids.max: 64
  - name: leak-oom
    unit: sentinel-leak-oom.service
    memory.max: 64M
  - name: bus
    unit: sentinel-leak-bus.service
    memory.max: 64M
  - name: leak-term
    unit: sentinel-leak-term.service
    memory.max: 160M
    terminate_above: 48M
    grace: 10s
  - name: late
    unit: "sentinel-late-*.service"
    memory.max: 96M
    pids.max: 16
'

# A contained unit: python3 may run, anything else it executes freezes the unit.
CONTAINED=sentinel-contained
CONTAINED_SERVICE=system.slice/$CONTAINED.service
CONTAINED_POLICY='  - name: contained
    unit: sentinel-contained.service
    exec.allow: [/usr/bin/python3]
    on_violation: freeze
'
# It waits for its go file, then executes a file its policy does not allow.
CONTAINED_PY='import os, subprocess, time
while not os.path.exists("/run/sentinel-contained.go"):
    time.sleep(0.2)
subprocess.run(["/usr/bin/touch", "/run/sentinel-contained.touched"])
while True:
    time.sleep(1)
'

# A service that allocates memory steadily once its go file exists, and notes a SIGTERM.
LEAK='#!/usr/bin/python3
import os, signal, sys, time
go, marker = sys.argv[1], sys.argv[2]
def stop(signum, frame):
    with open(marker, "w") as note:
        note.write("SIGTERM\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while not os.path.exists(go):
    time.sleep(0.2)
blocks = []
while True:
    blocks.append(b"\x01" * (1 << 20))
    time.sleep(0.05)
'

leak_unit() {
    printf '[Unit]\nDescription=Sentinel suite: a service that leaks memory\n[Service]\nExecStart=/usr/local/bin/sentinel-leak /run/%s.go /run/%s.sigterm\n' "$1" "$1" \
        > "/etc/systemd/system/$1.service"
}

nginx_limits() {
    echo "$(systemctl show nginx $LIMITS | sort | tr '\n' ' ')| $(cat 2>/dev/null $NGINX_CGROUP/memory.max \
        $NGINX_CGROUP/memory.high $NGINX_CGROUP/cpu.max $NGINX_CGROUP/cpu.weight \
        $NGINX_CGROUP/pids.max | tr '\n' ' ')"
}

nginx_has_policy_limits() {
    [ "$(nginx_limits)" = "$NGINX_SHOWN | $NGINX_FILES " ]
}

nginx_as_before() {
    [ "$(nginx_limits)" = "$(cat $KEPT/nginx.before)" ]
}

late_shown() {
    systemctl show $LATE -p MemoryMax -p TasksMax | sort | tr '\n' ' '
}

late_limits() {
    echo "$(late_shown)| $(cat 2>/dev/null $LATE_CGROUP/memory.max $LATE_CGROUP/pids.max | tr '\n' ' ')"
}

late_has_policy_limits() {
    [ "$(late_limits)" = "$LATE_SHOWN | $LATE_FILES " ]
}

# metric 'NAME{LABELS}': the sample's value from /metrics, empty when the series is absent.
metric() {
    curl -sf "$METRICS" | awk -v series="$1" '$1 == series { print $2 }'
}

metric_is() {
    [ "$(metric "$1")" = "$2" ]
}

metric_is_not() {
    local value
    value=$(metric "$1")
    [ -n "$value" ] && [ "$value" != "$2" ]
}

set_policies() {
    printf '%s' "$1" > "$CONFIG" && systemctl reload sentinel
}

test_install() {
    # Before Sentinel: an administrator's own runtime property and drop-in, which Sentinel's
    # undo must leave exactly as they are; and the units the suite's policies police.
    mkdir -p $KEPT /etc/systemd/system/nginx.service.d
    printf '[Service]\nMemoryHigh=900M\n' > /etc/systemd/system/nginx.service.d/10-admin.conf
    printf '%s' "$LEAK" > /usr/local/bin/sentinel-leak
    chmod 755 /usr/local/bin/sentinel-leak
    leak_unit sentinel-leak-oom
    leak_unit sentinel-leak-term
    leak_unit sentinel-leak-bus
    printf '[Unit]\nDescription=Sentinel suite: a unit started after Sentinel\n[Service]\nExecStart=/bin/sleep infinity\n' \
        > /etc/systemd/system/$LATE
    systemctl daemon-reload
    systemctl set-property --runtime nginx TasksMax=300 || return 1
    nginx_limits > $KEPT/nginx.before
    late_shown > $KEPT/late.before
    cp -a $CONTROL $KEPT/control.before
    echo "nginx before Sentinel: $(cat $KEPT/nginx.before)"
    # Offline: nftables, Sentinel's one dependency, is in the image.
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$SUITE_DIR"/sentinel_*.deb || return 1
    # The man page and the completions, generated from the command line's definition, are in
    # the package (read from the .deb: this image, like minimal ones, leaves out man pages).
    local deb shipped
    deb=$(ls "$SUITE_DIR"/sentinel_*.deb)
    shipped=$(dpkg-deb -c "$deb" | grep -E '/man1/sentinel\.1|/completions/sentinel$|/_sentinel$|/sentinel\.fish$')
    echo "$shipped"
    [ "$(wc -l <<< "$shipped")" -eq 4 ] || return 1
    dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/share/man/man1/sentinel.1*' \
        | zcat -f | grep -q '^\.TH sentinel 1'
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

# a: a unit's limits are set through systemd, and systemd keeps them across a restart of the
# unit and a daemon-reload.
test_unit_limits() {
    set_policies "$POLICIES" || return 1
    wait_for 60 nginx_has_policy_limits
    echo "after the policy: $(nginx_limits)"
    nginx_has_policy_limits || return 1
    ls $CONTROL/nginx.service.d
    local drift
    drift=$(metric 'sentinel_policy_drift_total{service="system.slice/nginx.service"}')
    systemctl restart nginx || return 1
    wait_for 30 nginx_has_policy_limits
    echo "after systemctl restart nginx: $(nginx_limits)"
    nginx_has_policy_limits || return 1
    systemctl daemon-reload
    wait_for 30 nginx_has_policy_limits
    echo "after systemctl daemon-reload: $(nginx_limits)"
    nginx_has_policy_limits || return 1
    # Nothing fought systemd over the restart and the reload.
    echo "drift counted: ${drift:-none} before, $(metric \
        'sentinel_policy_drift_total{service="system.slice/nginx.service"}') after"
    metric_is 'sentinel_policy_drift_total{service="system.slice/nginx.service"}' "$drift"
}

# a: a glob policy (`unit: "sentinel-late-*.service"`) gives a unit that starts only now, with
# Sentinel running, its limits through systemd.
test_late_unit() {
    echo "before the start: $(late_limits)"
    systemctl start $LATE || return 1
    wait_for 30 late_has_policy_limits
    echo "after systemctl start $LATE: $(late_limits)"
    ls $CONTROL/$LATE.d
    late_has_policy_limits
}

prometheus_has() {
    curl -sf "$PROMETHEUS/api/v1/query" --data-urlencode "query=$1" | grep -q '"value"'
}

unit_stopped() {
    ! systemctl is-active --quiet "$1"
}

# b: a leaking service is OOM-killed at its policy's memory.max, counted once.
test_oom_kill() {
    local unit=sentinel-leak-oom
    local series="sentinel_oom_kills_total{service=\"system.slice/$unit.service\"}"
    local before after result
    rm -f /run/$unit.go
    systemctl start $unit || return 1
    wait_for 30 grep -qx 67108864 /sys/fs/cgroup/system.slice/$unit.service/memory.max || {
        echo "the policy's memory.max is not in place"
        return 1
    }
    # Its series exists before the kill (its exec was counted), and Prometheus has a sample, so
    # the alert's increase() sees the kill.
    wait_for 30 metric_is "$series" 0 || { echo "$series is not 0: '$(metric "$series")'"; return 1; }
    wait_for 90 prometheus_has "$series" || { echo "Prometheus has no $series"; return 1; }
    before=$(metric "$series")
    touch /run/$unit.go
    wait_for 120 unit_stopped $unit
    result=$(systemctl show -p Result --value $unit)
    wait_for 30 metric_is_not "$series" "$before"
    after=$(metric "$series")
    echo "systemctl show -p Result $unit: $result; $series: $before -> $after"
    journalctl -u $unit --no-pager -n 5 -o cat
    [ "$result" = oom-kill ] && [ "$after" = $((before + 1)) ]
}

# b: with terminate_above, Sentinel sends SIGTERM first, and the service sees it.
test_graceful_stop() {
    local unit=sentinel-leak-term
    local series="sentinel_actions_total{service=\"system.slice/$unit.service\",action=\"sigterm\"}"
    local result
    rm -f /run/$unit.go /run/$unit.sigterm
    systemctl start $unit || return 1
    wait_for 30 grep -qx 167772160 /sys/fs/cgroup/system.slice/$unit.service/memory.max || {
        echo "the policy's memory.max is not in place"
        return 1
    }
    touch /run/$unit.go
    wait_for 120 unit_stopped $unit
    result=$(systemctl show -p Result --value $unit)
    echo "systemctl show -p Result $unit: $result; the service noted: $(cat /run/$unit.sigterm 2>&1)"
    echo "$series $(metric "$series")"
    [ "$(cat /run/$unit.sigterm)" = SIGTERM ] && [ "$result" = success ] && metric_is "$series" 1
}

freezer_state() {
    systemctl show -p FreezerState --value $CONTAINED
}

contained_in_kernel() {
    journalctl -u sentinel --no-pager -o cat | grep 'exec containment watches the service' \
        | grep -q "$CONTAINED_SERVICE"
}

freezer_state_is() {
    [ "$(freezer_state)" = "$1" ]
}

# Containment of a unit: the exec its policy does not allow freezes it through systemd
# (FreezeUnit, so systemctl knows), and `sentinel release` thaws it, audited both ways.
test_contain_freeze() {
    local contained="sentinel_contained{service=\"$CONTAINED_SERVICE\",action=\"freeze\"}"
    local events=/sys/fs/cgroup/$CONTAINED_SERVICE/cgroup.events
    printf '%s' "$CONTAINED_PY" > /usr/local/lib/$CONTAINED.py
    printf '[Unit]\nDescription=Sentinel suite: a contained service\n[Service]\nExecStart=/usr/bin/python3 /usr/local/lib/%s.py\n' \
        $CONTAINED > /etc/systemd/system/$CONTAINED.service
    systemctl daemon-reload
    rm -f /run/$CONTAINED.go
    set_policies "$POLICIES$CONTAINED_POLICY" || return 1
    systemctl start $CONTAINED || return 1
    # The kernel checks the unit's execs once the daemon has listed its cgroup.
    wait_for 30 contained_in_kernel || { echo "the unit's cgroup was not contained"; return 1; }
    echo "before the violation: FreezerState=$(freezer_state); $(grep frozen $events)"
    freezer_state_is running || return 1
    touch /run/$CONTAINED.go
    wait_for 30 freezer_state_is frozen
    echo "after the violation: FreezerState=$(freezer_state); $(grep frozen $events); $contained $(metric "$contained")"
    freezer_state_is frozen && grep -qx 'frozen 1' $events && metric_is "$contained" 1 || return 1
    sentinel status | grep "$CONTAINED_SERVICE" || return 1
    sentinel release $CONTAINED_SERVICE || return 1
    wait_for 10 freezer_state_is running
    echo "after sentinel release: FreezerState=$(freezer_state); $(grep frozen $events); $contained $(metric "$contained")"
    freezer_state_is running && grep -qx 'frozen 0' $events && metric_is "$contained" 0 || return 1
    grep "\"service\":\"$CONTAINED_SERVICE\"" /var/log/sentinel/audit.log
    [ "$(grep "\"service\":\"$CONTAINED_SERVICE\"" /var/log/sentinel/audit.log \
        | sed 's/.*"action":"\([a-z_]*\)".*/\1/' | tr '\n' ' ')" = "freeze release " ] || return 1
    systemctl stop $CONTAINED
    set_policies "$POLICIES"
}

# 5: with the system bus stopped, a unit's limits are not written behind systemd's back: the
# failure is logged and counted, and the limits come once the bus answers again. (A unit that
# never had them: systemd itself applies the drop-ins of one that had.)
test_bus_unavailable() {
    local unit=sentinel-leak-bus
    local cgroup=/sys/fs/cgroup/system.slice/$unit.service
    local series="sentinel_actions_total{service=\"system.slice/$unit.service\",action=\"failed\"}"
    local bus failed limit started lines window
    bus=$(systemctl show -p MainPID --value dbus)
    started=$(date +%s)
    rm -f /run/$unit.go
    kill -STOP "$bus"
    systemctl start $unit || { kill -CONT "$bus"; return 1; }
    # Sentinel's call waits for systemd's answer up to 25 s.
    wait_for 90 metric_is "$series" 1
    failed=$(metric "$series")
    limit=$(cat $cgroup/memory.max)
    kill -CONT "$bus"
    echo "bus stopped: $series ${failed:-absent}, memory.max $limit"
    journalctl -u sentinel --no-pager -n 5 -o cat | grep -F "did not answer"
    wait_for 60 grep -qx 67108864 $cgroup/memory.max
    echo "bus answering again: memory.max $(cat $cgroup/memory.max)"
    systemctl stop $unit
    lines=$(journalctl -u sentinel --since "@$started" -o cat | grep -c 'did not answer')
    window=$(($(date +%s) - started))
    # Tried again once per 10 s, not at every 0.5 s check.
    echo "'did not answer' lines in the $window s window: $lines (at most $((window / 10 + 1)))"
    [ "$failed" = 1 ] && [ "$limit" = max ] && [ "$(metric "$series")" = 1 ] &&
        [ "$lines" -ge 1 ] && [ "$lines" -le $((window / 10 + 1)) ]
}

# c: a limit changed behind Sentinel's back is put back through systemd and counted as drift.
test_drift() {
    local series='sentinel_policy_drift_total{service="system.slice/nginx.service"}'
    local before after
    before=$(metric "$series")
    systemctl set-property --runtime nginx MemoryMax=2G || return 1
    wait_for 30 metric_is_not "$series" "$before"
    wait_for 30 nginx_has_policy_limits
    after=$(metric "$series")
    echo "after set-property MemoryMax=2G: $(nginx_limits); drift ${before:-absent} -> $after"
    journalctl -u sentinel --no-pager -n 3 -o cat
    nginx_has_policy_limits && [ "$after" = $((${before:-0} + 1)) ]
}

# c: an administrator's drop-in in /etc that sorts after Sentinel's runtime one
# (override.conf after 50-MemoryMax.conf: systemd reads drop-ins in name order, whatever their
# directory) wins at the next daemon-reload; Sentinel sees the new value, puts its own back
# through systemd and counts the drift once. Without the file, a daemon-reload changes nothing.
test_drift_drop_in() {
    local series='sentinel_policy_drift_total{service="system.slice/nginx.service"}'
    local override=/etc/systemd/system/nginx.service.d/override.conf
    local before after started seen
    before=$(metric "$series")
    started=$(date +%s)
    printf '[Service]\nMemoryMax=3G\n' > $override
    systemctl daemon-reload
    wait_for 30 metric_is_not "$series" "$before"
    wait_for 30 nginx_has_policy_limits
    after=$(metric "$series")
    seen=$(journalctl -u sentinel --since "@$started" -o cat | grep -c 3221225472)
    echo "after $override (MemoryMax=3G) and daemon-reload: $(nginx_limits); drift" \
        "${before:-absent} -> $after; journal lines with 3G: $seen"
    journalctl -u sentinel --since "@$started" -o cat | tail -n 3
    rm $override
    systemctl daemon-reload
    # Four checks of the limits.
    sleep 2
    echo "after removing it and daemon-reload: $(nginx_limits); drift $(metric "$series")"
    [ "$after" = $((${before:-0} + 1)) ] && [ "$seen" = 1 ] && nginx_has_policy_limits &&
        metric_is "$series" "$after"
}

# d: what systemd had before Sentinel: values, cgroup files and runtime drop-ins.
everything_as_before() {
    local same=0
    echo "nginx now: $(nginx_limits)"
    echo "before:    $(cat $KEPT/nginx.before)"
    nginx_as_before || same=1
    echo "$LATE now: $(late_shown); before: $(cat $KEPT/late.before)"
    [ "$(late_shown)" = "$(cat $KEPT/late.before)" ] || same=1
    diff -r $KEPT/control.before $CONTROL || same=1
    return $same
}

# d: removing the policy gives every unit exactly its previous limits back.
test_undo() {
    set_policies 'policies: []
' || return 1
    wait_for 60 nginx_as_before
    everything_as_before
}

sentinel_restarted() {
    systemctl is-active --quiet sentinel &&
        [ "$(systemctl show -p MainPID --value sentinel)" != "$1" ]
}

# d: the same after the daemon was killed between applying and removing.
test_undo_after_kill() {
    local pid
    set_policies "$POLICIES" || return 1
    wait_for 60 nginx_has_policy_limits || return 1
    pid=$(systemctl show -p MainPID --value sentinel)
    kill -9 "$pid"
    wait_for 60 sentinel_restarted "$pid" || { echo "sentinel was not restarted"; return 1; }
    echo "sentinel killed (pid $pid) and restarted (pid $(systemctl show -p MainPID --value sentinel))"
    nginx_has_policy_limits || return 1
    set_policies 'policies: []
' || return 1
    wait_for 60 nginx_as_before
    everything_as_before
}

# The image's python3-minimal has no json module: one alert per line, then grep.
oom_alert_firing() {
    curl -sf "$PROMETHEUS/api/v1/alerts" | sed 's/{"labels":/\n/g' |
        grep '"alertname":"ServiceOOMKilled"' |
        grep '"service":"system.slice/sentinel-leak-oom.service"' | grep -q '"state":"firing"'
}

# e: Prometheus fires the shipped OOM alert (it evaluates every 15 s).
test_oom_alert() {
    wait_for 120 oom_alert_firing
    local firing=$?
    curl -sf "$PROMETHEUS/api/v1/alerts"
    echo
    return $firing
}

# f: purging the package while its policies enforce gives every unit its previous limits back
# (the package's prerm runs `sentinel restore-limits` once the daemon is stopped), and leaves
# nothing of Sentinel's behind.
test_purge() {
    local left=0 dir tasks
    set_policies "$POLICIES" || return 1
    wait_for 60 nginx_has_policy_limits || return 1
    wait_for 30 late_has_policy_limits || return 1
    echo "enforcing before the purge: nginx $(nginx_limits); $LATE $(late_limits)"
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
    # Every value, cgroup file and runtime drop-in as before Sentinel.
    everything_as_before || left=1
    # systemd's own values for the unit: no memory limit, and its default TasksMax.
    tasks=$(systemctl show -p TasksMax --value $LATE)
    [ "$tasks" = infinity ] && tasks=max
    echo "$LATE's cgroup files: $(cat $LATE_CGROUP/memory.max $LATE_CGROUP/pids.max | tr '\n' ' ')" \
        "(systemd's own: max $tasks)"
    [ "$(cat $LATE_CGROUP/memory.max)" = max ] && [ "$(cat $LATE_CGROUP/pids.max)" = "$tasks" ] ||
        left=1
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
