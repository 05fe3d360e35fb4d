#!/usr/bin/env bash
# make demo: snapmount's main job on a local demo image.
#
# 1. make a disk image with recognisable content: a GPT partition table
#    and an ext4 file system in its first partition (no root needed);
# 2. serve it with `snapmount serve` (the writable side, and snapshots);
# 3. mount a read-only snapshot of it with `snapmount mount --partitions`:
#    the disk, and its partition as a file of its own;
# 4. let a writer rewrite the image through NBD, round after round,
#    while the snapshot's SHA-256 stays what it was;
# 5. list and read a file inside the snapshot's partition (sleuthkit's fls
#    and icat, as the user running the demo);
# 6. print the mount's counters, unmount, stop the server, clean up.
set -euo pipefail

bin=$(realpath "${1:-bin/snapmount}")
work=$(mktemp -d "${TMPDIR:-/tmp}/snapmount-demo.XXXXXX")
image=$work/disk.img
sock=$work/nbd.sock
mnt=$work/snapshot
server_pid=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
	if grep -qs " $mnt " /proc/mounts; then
		"$bin" umount "$mnt" || fusermount3 -u -z "$mnt" || true
	fi
	if [ -n "$server_pid" ]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ] && [ ! -w /dev/fuse ]; then
	echo "demo: /dev/fuse is not usable by $(id -un): run as root, or 'sudo chmod 0666 /dev/fuse' as desktop distributions ship it" >&2
	exit 1
fi

say "A 64 MiB disk image whose blocks say what they are, with an ext4 partition"
today=$(date +%F)
for i in $(seq 0 1023); do
	line=$(printf 'block %04d of the ORIGINAL demo disk, written %s' "$i" "$today")
	printf '%s\n' "$line"
	head -c $((65536 - ${#line} - 1)) /dev/zero
done >"$image"
# A GPT whose partition 1 (16 MiB from 1 MiB) holds an ext4 made from a
# directory tree, all in files: sfdisk and mkfs.ext4 -d need no root.
printf 'label: gpt\nstart=1MiB, size=16MiB, type=L, name="demo root"\n' | /sbin/sfdisk -q "$image"
mkdir -p "$work/tree/etc"
printf 'Written %s into the ORIGINAL demo disk.\n' "$today" >"$work/tree/etc/motd"
truncate -s 16M "$work/p1.img"
/sbin/mkfs.ext4 -q -L demo-root -d "$work/tree" "$work/p1.img"
dd if="$work/p1.img" of="$image" bs=1M seek=1 conv=notrunc status=none
ls -l "$image"
/sbin/sfdisk -l "$image" | sed -n '/^Device/,$p'
original=$(sha256sum "$image" | cut -d' ' -f1)
echo "image SHA-256: $original"

say "Serving it: snapmount serve disk=$image on $sock"
"$bin" serve --no-tcp --socket "$sock" --snapshot-linger 5s "disk=$image" >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 200); do
	grep -q "listening on" "$work/serve.log" && break
	kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
	sleep 0.05
done
head -1 "$work/serve.log"

say "Mounting a frozen snapshot: snapmount mount --partitions nbd+unix:///disk?socket=... $mnt"
mkdir "$mnt"
# The mount sends the read-only promise: the server gives it a new
# snapshot (disk@sN) instead of the writer's slot. It returns once the
# files are readable: the disk, and its partition 1 as disk-p1.
"$bin" mount --partitions "nbd+unix:///disk?socket=$sock" "$mnt"
ls -l "$mnt"
dd if="$mnt/disk" bs=64K skip=600 count=1 status=none | head -1
echo "snapshot SHA-256: $(sha256sum "$mnt/disk" | cut -d' ' -f1)"

for round in 1 2 3; do
	say "Writer round $round: qemu-io rewrites the image through NBD"
	pattern=$(printf '0x%02x' $((0x40 + round)))
	qemu-io -f raw -c "write -P $pattern 0 64M" -c flush "nbd+unix:///disk?socket=$sock" | tail -1
	printf 'image    first bytes: %s   SHA-256: %s\n' "$(head -c 8 "$image" | od -An -tx1 | tr -d ' ')" "$(sha256sum "$image" | cut -d' ' -f1)"
	snap=$(sha256sum "$mnt/disk" | cut -d' ' -f1)
	printf 'snapshot first bytes: %s   SHA-256: %s\n' "$(head -c 8 "$mnt/disk" | od -An -tx1 | tr -d ' ')" "$snap"
	if [ "$snap" != "$original" ]; then
		echo "demo: the snapshot changed!" >&2
		exit 1
	fi
done
echo "The image changed three times; the snapshot still reads the original bytes."

say "Inside the snapshot's partition, as $(id -un): fls, ifind and icat on $mnt/disk-p1"
# The image's partition table is gone (the writer overwrote it); the
# snapshot's partition file still holds the ext4 it had.
fls -r -p "$mnt/disk-p1" | grep -v -e '\$OrphanFiles' -e lost+found
inode=$(ifind -n /etc/motd "$mnt/disk-p1")
printf 'etc/motd (inode %s): ' "$inode"
icat "$mnt/disk-p1" "$inode"

say "The mount's counters: snapmount stats $mnt"
"$bin" stats "$mnt"

say "Unmounting and stopping the server"
"$bin" umount "$mnt"
grep -s " $mnt " /proc/mounts || echo "nothing left mounted"
kill "$server_pid"
wait "$server_pid" || true
server_pid=
grep -E "snapshot (created|dropped)" "$work/serve.log" | sed 's/^/server log: /'
