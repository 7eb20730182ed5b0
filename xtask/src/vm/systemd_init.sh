#!/bin/sh
# /init of the systemd guest's initramfs (busybox sh): loads the disk drivers, mounts the root
# image from /dev/vda and hands PID 1 over to systemd.

# A failure here ends the run with the setup-failed verdict (qemu.rs, guest_init.sh).
fail() {
    echo "sentinel-init: BOOT FAILED: $*"
    echo "SENTINEL-VERDICT setup-failed $*" > /dev/ttyS1
    printf '\022' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
}

mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
read -r uptime _ < /proc/uptime
echo "sentinel-init: kernel $(uname -r) reached the initramfs after $uptime s"

while read -r module; do
    modprobe "$module" || fail "cannot load kernel module $module"
done < /etc/sentinel/modules-preload

# The disk appears when virtio_blk has probed it.
tries=0
until [ -b /dev/vda ]; do
    tries=$((tries + 1))
    [ $tries -le 100 ] || fail "no /dev/vda after 10 s"
    sleep 0.1
done
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
[ -x /newroot/lib/systemd/systemd ] || fail "/dev/vda has no /lib/systemd/systemd"

umount /proc /sys
mount --move /dev /newroot/dev || fail "cannot move /dev to the new root"
echo "sentinel-init: switching to systemd on /dev/vda"
exec switch_root /newroot /lib/systemd/systemd
