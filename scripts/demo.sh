#!/usr/bin/env bash
# The main job on the embedded default, from nothing: Node deps, libvirt/QEMU, a small running demo VM,
# then `vmbackup backup` with no TEMPORAL_ADDRESS (the CLI starts the local Temporal dev server and an
# in-process worker) to the default local target, where the backup is, and the next commands to try. On the way it
# puts `vmbackup` and `temporal` on PATH (scripts/install.sh: links in /usr/local/bin, or $VMBACKUP_BIN_DIR).
# Re-runnable. VMBACKUP_DEMO_DOMAIN names the demo VM (default vmbackup-demo; the tests use a name of their own).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${VMBACKUP_STATE_DIR:-$HOME/.local/state/vmbackup}
export VMBACKUP_STATE_DIR=$STATE
DOM=${VMBACKUP_DEMO_DOMAIN:-vmbackup-demo}
[[ $DOM =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "vmbackup: VMBACKUP_DEMO_DOMAIN '$DOM' is not a domain name" >&2; exit 2; }
BIN_DIR=${VMBACKUP_BIN_DIR:-/usr/local/bin}
DIR=$STATE/demo
[[ $DOM == vmbackup-demo ]] || DIR=$STATE/demo-$DOM

bash scripts/node-deps.sh
# first: a /usr/local/bin/vmbackup that is some other program stops the demo before the slow steps
VMBACKUP_BIN_DIR=$BIN_DIR bash scripts/install.sh
# the commands below are the ones just installed, as a newcomer's shell finds them
export PATH=$BIN_DIR:$PATH
bash scripts/stack.sh up libvirt
export LIBVIRT_DEFAULT_URI=qemu:///system

if ! virsh dominfo "$DOM" >/dev/null 2>&1; then
  echo "vmbackup: defining the demo VM $DOM (TCG, 256 MiB qcow2 disk with 64 MiB of data)" >&2
  mkdir -p "$DIR"
  qemu-img create -q -f qcow2 "$DIR/disk.qcow2" 256M
  qemu-io -f qcow2 -c 'write -P 0xab 0 32M' -c 'write -P 0xcd 128M 32M' "$DIR/disk.qcow2" >/dev/null
  cat > "$DIR/domain.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='$DIR/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='$DIR/serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <!-- QEMU runs as root here: the disk and the default staging dir live under \$HOME, which the
       libvirt-qemu user cannot reach (see README, "Where QEMU writes"). -->
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
XML
  virsh define "$DIR/domain.xml" >/dev/null
fi
[[ $(virsh domstate "$DOM") == running ]] || virsh start "$DOM" >/dev/null

# The embedded default: no cluster configured.
unset TEMPORAL_ADDRESS
# `backup` prints the backup id on stdout (progress and the result go to stderr)
id=$(vmbackup backup "$DOM" --wait | tail -n 1)
echo >&2
echo "vmbackup: backups of $DOM in the default local target ($STATE/backups):" >&2
vmbackup list --domain "$DOM"

cat >&2 <<EOF

vmbackup is on your PATH now ($(command -v vmbackup)). Next, try:
  vmbackup status $id                  # what Temporal recorded for this backup
  vmbackup list --domain $DOM          # the backups on the default target
  vmbackup verify $id                  # re-read the images and check their SHA-256
  vmbackup restore $id --to /tmp/$DOM-restore
  vmbackup backup $DOM --wait          # a second backup: incremental (only what changed)
  vmbackup schedule create demo-daily --domain $DOM --every 1d --at 02:00 --target file://$STATE/backups --keep-daily 7
  vmbackup worker                      # runs the scheduled backups; keep it running (vmbackup install-service)
  vmbackup report --stale 36h          # which VMs have a recent good backup
EOF
