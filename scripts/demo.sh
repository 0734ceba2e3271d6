#!/usr/bin/env bash
# The main job on the embedded default, from nothing: Node deps, libvirt/QEMU, a small running demo VM,
# then `vmbackup backup` with no TEMPORAL_ADDRESS (the CLI starts the local Temporal dev server and an
# in-process worker) to the default local target, and where the backup is. Re-runnable.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${VMBACKUP_STATE_DIR:-$HOME/.local/state/vmbackup}
export VMBACKUP_STATE_DIR=$STATE
DOM=vmbackup-demo
DIR=$STATE/demo

bash scripts/node-deps.sh
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
bin/vmbackup backup "$DOM" --wait
echo >&2
echo "vmbackup: backups of $DOM in the default local target ($STATE/backups):" >&2
bin/vmbackup list --domain "$DOM"
