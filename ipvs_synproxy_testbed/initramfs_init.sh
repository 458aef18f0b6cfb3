#!/bin/busybox sh
# /init of the testbed's initramfs: mount the host's root over 9p (read-only),
# put a tmpfs overlay on it, mount the build cache read-write at its host path,
# and switch_root into it so the guest runs the host's tools unchanged.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

die() {
	echo "initramfs: $*" >&2
	echo o >/proc/sysrq-trigger
	sleep 10
}

for m in $(cat /modules.list); do
	insmod "/modules/$m.ko" || die "insmod $m failed"
done

arg() {
	for kv in $(cat /proc/cmdline); do
		case "$kv" in "$1="*) echo "${kv#*=}" ;; esac
	done
}

build=$(arg sp_build)
init=$(arg sp_init)
nine="trans=virtio,version=9p2000.L,msize=512000"

mkdir -p /lower /rw /newroot
mount -t 9p -o "$nine,ro,cache=loose" hostroot /lower || die "9p root mount failed"
mount -t tmpfs -o mode=0755 tmpfs /rw || die "tmpfs failed"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	die "overlay mount failed"
mkdir -p "/newroot$build"
mount -t 9p -o "$nine,cache=none" build "/newroot$build" || die "9p build mount failed"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
