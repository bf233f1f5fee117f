#!/usr/bin/env bash
# start-local-slurm.sh - a single-node SLURM cluster on localhost, for phf's SLURM tests and for
# trying `phf -m ... hardware=slurm` on one machine.
# Debian 12, run as root. Idempotent: safe to re-run; restarts the daemons
# only if slurm.conf changed. Stop with stop-local-slurm.sh (PID files).
# Knobs: SLURM_DIR (state/logs/pids, default /tmp/slurm), SLURM_PARTITION
# (default debug), SLURM_CPUS (default nproc), SLURM_SACCT_SHIM (default 1).
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/slurm}
PARTITION=${SLURM_PARTITION:-debug}
CPUS=${SLURM_CPUS:-$(nproc)}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
RUN=$SLURM_DIR/run LOG=$SLURM_DIR/log
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
t0=$(date +%s.%N)
# PID file $1 names a live process called like the file (guards against PID reuse)
alive() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]; }
stop_pidfile() {  # stop the daemon whose PID is in $1, wait until it is gone
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  rm -f "$1"
}

# 1. install (only if missing). No systemd here: the packages' attempts to
#    start their services are refused (policy-rc.d) or fail; that is harmless.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  echo "installed slurm+munge in $(awk "BEGIN{print $(date +%s.%N)-$t0}")s"
fi
t1=$(date +%s.%N)
mkdir -p "$RUN" "$LOG" "$SLURM_DIR/state/ctld" "$SLURM_DIR/state/d" /etc/slurm

# 2. munge: key (the Debian package makes one; make one if absent) + daemon,
#    run as the munge user on the default socket /run/munge/munge.socket.2
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$RUN/munged.pid"   # we started it, so we stop it
fi
munge -n | unmunge >/dev/null || { echo "munge does not work" >&2; exit 1; }

# 3. slurm.conf: no cgroups, no accounting daemon, daemons and jobs as root
MEM=$(free -m | awk '/^Mem:/{print int($2*0.9)}')
cat > "$CONF.new" <<EOF
ClusterName=localci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
# An Epilog, even one that does nothing, makes slurmd report EPILOG_COMPLETE as a job ends, and
# slurmctld schedules at once on that message. Without one the freed CPUs wait for the next
# periodic pass (sched_interval): ~0.5 s per job of an array run one at a time, ~0.02 s with it.
Epilog=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$SLURM_DIR/state/ctld
SlurmdSpoolDir=$SLURM_DIR/state/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
InactiveLimit=0
KillWait=5
MinJobAge=3600
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$CONF.new" "$CONF"; then rm "$CONF.new"
else  # some settings (cred_expire, nodes) are read only at start: restart
  stop_pidfile "$RUN/slurmd.pid"; stop_pidfile "$RUN/slurmctld.pid"
  mv "$CONF.new" "$CONF"
fi

# 3b. sacct shim: submitit polls `sacct` for job states; without slurmdbd the
#     real one fails, and a job that dies before writing its result (cancel,
#     kill, timeout) would then be waited on forever.
SHIM=/usr/local/bin/sacct
if [ "${SLURM_SACCT_SHIM:-1}" = 1 ] && { [ ! -e $SHIM ] || grep -q 'local CI SLURM' $SHIM; }; then
  sed "s#@JOBCOMP@#$LOG/jobcomp.log#" > $SHIM <<'SHIM'
#!/bin/bash
# sacct shim for the local CI SLURM (written by start-local-slurm.sh).
# The cluster has no slurmdbd, so the real sacct fails. Queries of the form
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]   (submitit's)
# are answered from the job-completion log + slurmctld memory (squeue -t all);
# anything else goes to the real sacct --completion.
REAL=/usr/bin/sacct JOBCOMP=@JOBCOMP@
fields=JobID,State,NodeList ids="" header=1 argv=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--format) fields=$2; shift ;;
    -o*) fields=${1#-o} ;;
    --format=*) fields=${1#--format=} ;;
    -j|--jobs) ids="$ids,$2"; shift ;;
    -j*) ids="$ids,${1#-j}" ;;
    --jobs=*) ids="$ids,${1#--jobs=}" ;;
    -P|--parsable2|-X|--allocations) ;;
    -n|--noheader) header="" ;;
    *) exec "$REAL" --completion "${argv[@]}" ;;
  esac
  shift
done
[ -n "$ids" ] || exec "$REAL" --completion "${argv[@]}"
{ [ -r "$JOBCOMP" ] && awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = substr($i, length(kv[1]) + 2) }
         id = f["JobId"]; base = id
         if (f["ArrayJobId"] != "") { base = f["ArrayJobId"]; id = base "_" f["ArrayTaskId"] }
         print base "|" id "|" f["JobState"] "|" f["NodeList"] "|" f["Name"]; delete f }' "$JOBCOMP"
  squeue -h -t all -o '%F|%i|%T|%N|%j' 2>/dev/null
} | awk -F'|' -v ids="$ids" -v fields="$fields" -v header="$header" '
  BEGIN { n = split(ids, a, ","); for (i = 1; i <= n; i++) if (a[i] != "") { split(a[i], b, "[_.]"); want[b[1]] = 1 }
          nf = split(fields, F, ","); col["jobid"] = 2; col["state"] = 3; col["nodelist"] = 4; col["jobname"] = 5
          for (i = 1; i <= nf; i++) { k = tolower(F[i]); sub(/%.*/, "", k)
            if (!(k in col)) { bad = 1 }; F[i] = k; out = out (i > 1 ? "|" : "") (k == "jobid" ? "JobID" : k == "state" ? "State" : k == "nodelist" ? "NodeList" : "JobName") }
          if (bad) exit 3
          if (header) print out }
  ($1 in want) { line = ""; for (i = 1; i <= nf; i++) line = line (i > 1 ? "|" : "") $(col[F[i]]); print line }'
rc=${PIPESTATUS[1]}
[ "$rc" = 3 ] && exec "$REAL" --completion "${argv[@]}"
exit 0
SHIM
  chmod 755 $SHIM
fi

# 4. daemons: both fork into the background and write PID files under $RUN
alive "$RUN/slurmctld.pid" || slurmctld
alive "$RUN/slurmd.pid" || slurmd

# 5. wait until the node takes jobs
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    *drain*|down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
sinfo
case "$state" in idle|mixed|allocated) ;; *)
  echo "node not ready (state=$state); see $LOG/slurmctld.log $LOG/slurmd.log" >&2; exit 1 ;; esac
echo "SLURM up in $(awk "BEGIN{print $(date +%s.%N)-$t1}")s (after install): partition=$PARTITION node=$NODE cpus=$CPUS"
echo "stop it with: SLURM_DIR=$SLURM_DIR bash $(dirname "$(readlink -f "$0")")/stop-local-slurm.sh"
